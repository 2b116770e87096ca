#!/usr/bin/env bash
# Prepared in session 8 (not yet run): lockstep rounds with the plain tail were the fastest
# configuration at batch 128 x 16k (pillar_block 36,775 tokens/s against 34,046 unified); before the
# default changes, the same comparison at the other shapes of the table.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/sched"
timeout 540 python3 benchmarks/throughput.py --out "$OUT/sched" --shapes 16x16384,64x2048,128x2048 \
    --methods sparsespec_block,sparsespec_block_lockstep,nospec > "$OUT/sched/throughput.log" 2>&1
grep FAILED "$OUT/sched/throughput.log" | cut -c1-300; grep -A 12 "^| model" "$OUT/sched/throughput.log"
