#!/usr/bin/env bash
# Session 8: the Qwen3-8B shape (batch 64 x 8k, random weights, lockstep rounds) with the selection
# kernel: ms per draft and per verification step against the floors (session 7: 9.83 and 69.7 ms).
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/qwen"
timeout 380 python3 benchmarks/throughput.py --out "$OUT/qwen" --skip-bench --qwen8b \
    --qwen-methods sparsespec_block,sparsespec > "$OUT/qwen/throughput.log" 2>&1
grep FAILED "$OUT/qwen/throughput.log" | cut -c1-300; grep -A 6 "^| model" "$OUT/qwen/throughput.log"
grep -h '"method"' "$OUT/qwen/throughput.log" | cut -c1-700
