#!/usr/bin/env bash
# Session 8, first call. (1) pillar_block without its recent window at 128 x 16k (prepared in
# session 7 as device_part_y.sh), side by side with the same selection in lockstep rounds: a
# unified mixed step costs ~2.0 ms while a pure draft step costs 0.66 ms, so 8 drafts + 1 verify
# per 9 steps may cost less in lockstep than 9 mixed steps. (2) Kernel time of a pure draft step
# (where a step's fixed cost goes when attention is small).
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/b128"
timeout 330 python3 benchmarks/throughput.py --out "$OUT/b128" --shapes 128x16384 \
    --methods sparsespec_block,sparsespec_block_lockstep,nospec > "$OUT/b128/throughput.log" 2>&1
grep FAILED "$OUT/b128/throughput.log" | cut -c1-300; grep -A 40 "^| model" "$OUT/b128/throughput.log"
grep -h "accepted_per_request\|steps by kind\|spread" "$OUT/b128/throughput.log" | cut -c1-300 | head -12
timeout 150 python3 benchmarks/profile_step.py --out "$OUT" --kind draft --steps 30 --selection pillar_block > "$OUT/profile_draft.log" 2>&1; grep -v -i warn "$OUT/profile_draft.log" | head -45 | cut -c1-140
