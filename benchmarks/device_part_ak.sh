#!/usr/bin/env bash
# Session 10, call 2: where the device time of today's steps goes. (1) bench-code-lm 128 x 16k, the
# default unified schedule's mixed steps (draft rows + verification rows); (2) the Qwen3-8B shape at
# 64 x 8k in lockstep rounds, a verification step and a draft step (session 8: 3.1x and 2.1x floor).
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/bench" "$OUT/qwen"
timeout 150 python3 benchmarks/profile_step.py --out "$OUT/bench" --batch 128 --context 16384 --kind draft+verify \
    --steps 30 > "$OUT/bench/log" 2>&1; head -45 "$OUT/bench/log" | cut -c1-150
timeout 300 python3 benchmarks/profile_step.py --out "$OUT/qwen" --qwen8b --batch 64 --context 8192 --new-tokens 24 \
    --kind verify,draft --steps 6 > "$OUT/qwen/log" 2>&1; grep -v "^ *[0-9.]* us  *[0-9.]*% " "$OUT/qwen/log" | tail -5
grep -A 30 "kernels per step" "$OUT/qwen/log" | cut -c1-150
