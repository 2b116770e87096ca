#!/usr/bin/env bash
# Prepared in session 8 for the next session's first call (nothing here has run on the device yet):
# (1) fp32 greedy identity with the session's changes (selection kernel, plain tail, whole-row tiles
# for verification-only steps, which a random 128-dim-head model in lockstep rounds exercises);
# (2) the Qwen3-8B shape with whole-row tiles (session 8 without them: verification 66.9 ms with
# block scores, 69.1 per position, floor 21.7).
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/check" "$OUT/qwen"
timeout 200 python3 benchmarks/gpu_check.py --out "$OUT/check" --fp32-only > "$OUT/check/log" 2>&1; grep -E "identical|Error" "$OUT/check/log" | cut -c1-300
timeout 330 python3 benchmarks/throughput.py --out "$OUT/qwen" --skip-bench --qwen8b \
    --qwen-methods sparsespec_block,sparsespec > "$OUT/qwen/throughput.log" 2>&1
grep FAILED "$OUT/qwen/throughput.log" | cut -c1-300; grep -A 6 "^| model" "$OUT/qwen/throughput.log"
grep -h '"method"' "$OUT/qwen/throughput.log" | cut -c1-700
