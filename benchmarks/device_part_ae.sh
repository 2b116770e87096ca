#!/usr/bin/env bash
# Session 8, last call: with the plain tail and the selection kernel, do fewer verification groups
# beat the unified schedule over all phases (device_part_ac.sh: sparsespec 34,400, block 34,000)?
# A step of 14 verification rows is latency-bound (107 us per layer alone, session8/tile_split).
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/b128"
timeout 190 python3 benchmarks/throughput.py --out "$OUT/b128" --shapes 128x16384 \
    --methods sparsespec_block_lockstep,sparsespec_2groups > "$OUT/b128/throughput.log" 2>&1
grep FAILED "$OUT/b128/throughput.log" | cut -c1-300; grep -A 6 "^| model" "$OUT/b128/throughput.log"
grep -h "accepted per request" "$OUT/b128/throughput.log" | cut -c1-400 | sort -u
