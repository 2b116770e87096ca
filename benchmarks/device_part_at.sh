#!/usr/bin/env bash
# Session 11, call 5, with the finish kernel capped at 128 registers for heads of <= 64 dims: (1) the kernel
# A/B again (its default is now that cap); (2) fp32 greedy identity: the bench model (default and lockstep
# rounds) and the random 128-dim-head model in lockstep rounds (draft-only steps over 64-position blocks).
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/splits" "$OUT/check" "$OUT/wide"
timeout 100 python3 benchmarks/kernels_check.py --out "$OUT/splits" --only draft-splits > "$OUT/splits/log" 2>&1
grep -v "^\[time\]" "$OUT/splits/log" | grep -i "error\|mismatch" | cut -c1-200; grep -A 14 "^case " "$OUT/splits/log" | cut -c1-130
timeout 130 python3 benchmarks/gpu_check.py --out "$OUT/check" --fp32-only > "$OUT/check/log" 2>&1; grep -E "identical|Error" "$OUT/check/log" | cut -c1-300
timeout 120 python3 benchmarks/gpu_check.py --out "$OUT/wide" --wide-only > "$OUT/wide/log" 2>&1; grep -E "identical|Error" "$OUT/wide/log" | cut -c1-300
