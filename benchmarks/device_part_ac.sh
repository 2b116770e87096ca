#!/usr/bin/env bash
# Session 8: the selection kernel's second form (keys stored once, top 8 bits counted by comparison
# instead of tl.histogram's atomics on a few bins) and the sliced top-k filter, each against what
# it replaces; then batch 128 x 16k with both (plain tail on), side by side with nospec.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/sel" "$OUT/b128"
timeout 150 python3 benchmarks/kernels_check.py --out "$OUT/sel" --only selection > "$OUT/sel/log" 2>&1
grep -E "^\[(selection|top-k|error)\]" "$OUT/sel/log" | grep -v "chunk" | cut -c1-200; grep -i "error" -A5 "$OUT/sel/log" | head -20
timeout 330 python3 benchmarks/throughput.py --out "$OUT/b128" --shapes 128x16384 \
    --methods sparsespec,sparsespec_block,nospec > "$OUT/b128/throughput.log" 2>&1
grep FAILED "$OUT/b128/throughput.log" | cut -c1-300; grep -A 10 "^| model" "$OUT/b128/throughput.log"
grep -h "accepted per request" "$OUT/b128/throughput.log" | cut -c1-400 | sort -u
