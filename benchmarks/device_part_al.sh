#!/usr/bin/env bash
# Session 10, call 3: the per-position score pass in isolation (kernels_check --only score-pass):
# unified b128 x 16k bench step and the Qwen3-8B lockstep verification, with and without scores,
# and finish-kernel variants (score tile rows, warps, stages, registers).
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/score_pass"
timeout 280 python3 benchmarks/kernels_check.py --out "$OUT/score_pass" --only score-pass > "$OUT/score_pass/log" 2>&1
grep -v "^\[time\]" "$OUT/score_pass/log" | grep -v Loading | tail -40 | cut -c1-200
