#!/usr/bin/env bash
# Session 9, first call: (1) fp32 greedy identity with session 8's changes and this session's draft
# bursts (lockstep rounds run a round's drafts as one graph replay); (2) batch 128 x 16k: lockstep with
# and without bursts, the unified default and nospec, with the host's own time per iteration.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/check" "$OUT/bursts"
timeout 170 python3 benchmarks/gpu_check.py --out "$OUT/check" --fp32-only > "$OUT/check/log" 2>&1; grep -E "identical|Error" "$OUT/check/log" | cut -c1-400
timeout 400 python3 benchmarks/throughput.py --out "$OUT/bursts" --shapes 128x16384 \
    --methods sparsespec_block_lockstep,sparsespec_block_lockstep_no_bursts,sparsespec,nospec > "$OUT/bursts/throughput.log" 2>&1
grep FAILED "$OUT/bursts/throughput.log" | cut -c1-300; grep -A 8 "^| model" "$OUT/bursts/throughput.log"
grep "accepted per request" "$OUT/bursts/throughput.log"
