#!/usr/bin/env bash
# Written in session 14, run in session 16 (calls 1 and 3, results/h200/session16/): bench-code-lm 128 x 16k in one process, alternating after a warm-up each:
# sparsespec (pillar), sparsespec_block (pillar_block: block masses summed in the attention pass,
# no score pass) and nospec, three rounds (rows are written as they finish; LIMIT=seconds cuts it short).
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/ab"
V=sparsespec,sparsespec_block,nospec
timeout "${LIMIT:-450}" python3 benchmarks/one_process_ab.py --out "$OUT/ab" --variants $V,$V,$V > "$OUT/ab/log" 2>&1; echo "ab rc=$?"
grep -v "it/s\]" "$OUT/ab/log" | tail -12 | cut -c1-300
