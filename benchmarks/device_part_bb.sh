#!/usr/bin/env bash
# Session 13, call 6: bench-code-lm 128 x 16k, sparsespec (early drafts) and nospec side by side, two
# alternating pairs of processes.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/tp"
timeout 260 python3 benchmarks/throughput.py --out "$OUT/tp" --shapes 128x16384 --methods sparsespec,nospec,sparsespec,nospec \
    > "$OUT/tp/throughput.log" 2>&1
grep FAILED "$OUT/tp/throughput.log" | cut -c1-300
