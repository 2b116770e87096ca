#!/usr/bin/env bash
# Session 6, last device minutes: float32 greedy output with the new decode-tile defaults (register
# caps, 128-position KV blocks, fewer splits for small heads) against transformers' greedy generate.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT"
timeout 200 python3 benchmarks/gpu_check.py --out "$OUT" --fp32-only > "$OUT/gpu_check.log" 2>&1
echo "rc=$?"; grep -E "identical|Error|error" "$OUT/gpu_check.log" | cut -c1-400
