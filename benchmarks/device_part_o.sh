#!/usr/bin/env bash
# Session 5, last device minutes: float32 greedy output with selection="pillar_block" (block
# scores summed in the attention kernel, CUDA graphs) against transformers' greedy generate.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT"
timeout 165 python3 benchmarks/gpu_check.py --out "$OUT" --selection pillar_block --fp32-only > "$OUT/gpu_check.log" 2>&1
echo "rc=$?"; grep -E "identical|Error|error" "$OUT/gpu_check.log" | cut -c1-400
