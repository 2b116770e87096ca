#!/usr/bin/env bash
# Session 11, call 2, with draft-only steps unsplit, whole-row verification steps unsplit at 64 x 8k
# (Qwen3-8B heads) and the selected positions looked up a block ahead: (1) the kernel A/B
# (kernels_check --only draft-splits); (2) bench-code-lm 128 x 16k, sparsespec and nospec side by
# side; (3) fp32 greedy identity (default and lockstep rounds, whose draft steps are draft-only).
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/splits" "$OUT/tp" "$OUT/check"
timeout 150 python3 benchmarks/kernels_check.py --out "$OUT/splits" --only draft-splits > "$OUT/splits/log" 2>&1
grep -v "^\[time\]" "$OUT/splits/log" | grep -i "error\|mismatch" | cut -c1-200; grep -A 14 "^case " "$OUT/splits/log" | cut -c1-130
timeout 150 python3 benchmarks/throughput.py --out "$OUT/tp" --shapes 128x16384 --methods sparsespec,nospec > "$OUT/tp/throughput.log" 2>&1
grep FAILED "$OUT/tp/throughput.log" | cut -c1-300; grep -A 4 "^| model" "$OUT/tp/throughput.log"; grep "accepted per request" "$OUT/tp/throughput.log" | cut -c1-420
timeout 150 python3 benchmarks/gpu_check.py --out "$OUT/check" --fp32-only > "$OUT/check/log" 2>&1; grep -E "identical|Error" "$OUT/check/log" | cut -c1-300
