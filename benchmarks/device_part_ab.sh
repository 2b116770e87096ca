#!/usr/bin/env bash
# Session 8: the batch's thin tail decoded plainly (plain_tail=0.5, the new default) with the Triton
# selection kernel, at batch 128 x 16k, side by side with speculation to the end and nospec.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/b128"
timeout 420 python3 benchmarks/throughput.py --out "$OUT/b128" --shapes 128x16384 \
    --methods sparsespec_block,sparsespec_block_no_tail,sparsespec,nospec > "$OUT/b128/throughput.log" 2>&1
grep FAILED "$OUT/b128/throughput.log" | cut -c1-300; grep -A 10 "^| model" "$OUT/b128/throughput.log"
grep -h "accepted per request" "$OUT/b128/throughput.log" | cut -c1-400 | sort -u
