#!/usr/bin/env bash
# Session 10, call 5: (1) bench-code-lm 128 x 16k in one call: sparsespec, the same with the score tile
# sized as in session 9 (room for 16 queries), nospec; (2) the score-pass sweep with the whole-row
# finish cap at 128; (3) fp32 greedy identity of the 128-dim-head model in lockstep (whole-row tiles).
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/tp" "$OUT/score_pass" "$OUT/check"
timeout 210 python3 benchmarks/throughput.py --out "$OUT/tp" --shapes 128x16384 \
    --methods sparsespec,sparsespec_score_tile_16q,nospec > "$OUT/tp/throughput.log" 2>&1
grep FAILED "$OUT/tp/throughput.log" | cut -c1-300; grep -A 5 "^| model" "$OUT/tp/throughput.log"; grep "accepted per request" "$OUT/tp/throughput.log" | cut -c1-420
timeout 90 python3 benchmarks/kernels_check.py --out "$OUT/score_pass" --only score-pass > "$OUT/score_pass/log" 2>&1
grep "matches\|MISMATCH\|error" "$OUT/score_pass/log" | grep -v "^\[time\]" | cut -c1-160
timeout 110 python3 benchmarks/gpu_check.py --out "$OUT/check" --wide-only > "$OUT/check/log" 2>&1; grep -E "identical|Error" "$OUT/check/log" | cut -c1-300
