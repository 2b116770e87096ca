#!/usr/bin/env bash
# Session 6, last device call: 16-row decode tiles of <= 64-dim heads now take 128-position KV
# blocks and 4 items per SM (device_part_r.sh's tuning sweep). Batch 128 x 16k side by side
# (pillar, pillar_block, nospec) with them, then the knobs again: old against new defaults for
# the bench-code-lm heads, 128-position blocks for the Qwen3-8B shape's steps.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/b128" "$OUT/tuning"
timeout 200 python3 benchmarks/throughput.py --out "$OUT/b128" --shapes 128x16384 \
    --methods sparsespec_block,sparsespec,nospec > "$OUT/b128/throughput.log" 2>&1
grep FAILED "$OUT/b128/throughput.log" | cut -c1-300; cat "$OUT/b128/throughput.md"
timeout 170 python3 benchmarks/kernels_check.py --out "$OUT/tuning" --only tuning > "$OUT/tuning/kernels.log" 2>&1
grep -E "^\[time\]|error|MISMATCH" "$OUT/tuning/kernels.log" | cut -c1-150
