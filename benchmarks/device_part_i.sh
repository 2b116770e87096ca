#!/usr/bin/env bash
# Session 4, last device call: does adaptive draft length help beyond batch 128 x 16k? Engine
# methods only, side by side at batch 1 and 64 (2k) and batch 16 (16k).
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT"
timeout 330 python3 benchmarks/throughput.py --out "$OUT" --shapes 1x2048,64x2048,16x16384 \
    --methods sparsespec,sparsespec_adaptive,nospec > "$OUT/throughput.log" 2>&1
grep FAILED "$OUT/throughput.log" | cut -c1-300; cat "$OUT/throughput.md"
