#!/usr/bin/env bash
# Prepared in session 7 for the next session's first device call: "pillar_block" now forces no
# recent window (CPU screen: ahead at 10% and 4k/5%, behind pillar by 0.21 at 2% and 8k/5%). Does
# it keep pillar's acceptance at 16k/5% on the H200 (sessions 5-7, with the recent half: 5.08
# against 5.09 over six runs), and what does it do to tokens/s? Batch 128 x 16k side by side, with
# per-request acceptance spread.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/b128"
timeout 300 python3 benchmarks/throughput.py --out "$OUT/b128" --shapes 128x16384 \
    --methods sparsespec_block,sparsespec,nospec > "$OUT/b128/throughput.log" 2>&1
grep FAILED "$OUT/b128/throughput.log" | cut -c1-300; grep -A 40 "^| model" "$OUT/b128/throughput.log"
