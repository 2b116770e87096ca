#!/usr/bin/env bash
# Session 10, call 4, with the score tile sized from the verification length (bench: 32 rows, not 64)
# and the finish kernel capped at 168 registers for whole-row tiles: (1) the score-pass sweep against
# the session-9 settings; (2) bench-code-lm 128 x 16k, sparsespec and nospec; (3) the Qwen3-8B shape
# (64 x 8k, lockstep) for ms per draft and verification step against the floors; (4) fp32 greedy identity.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/score_pass" "$OUT/tp" "$OUT/qwen" "$OUT/check"
timeout 100 python3 benchmarks/kernels_check.py --out "$OUT/score_pass" --only score-pass > "$OUT/score_pass/log" 2>&1
grep "matches\|MISMATCH\|error" "$OUT/score_pass/log" | grep -v "^\[time\]" | cut -c1-160
timeout 140 python3 benchmarks/throughput.py --out "$OUT/tp" --shapes 128x16384 --methods sparsespec,nospec > "$OUT/tp/throughput.log" 2>&1
grep FAILED "$OUT/tp/throughput.log" | cut -c1-300; grep -A 4 "^| model" "$OUT/tp/throughput.log"; grep "accepted per request" "$OUT/tp/throughput.log" | cut -c1-420
timeout 190 python3 benchmarks/throughput.py --out "$OUT/qwen" --skip-bench --qwen8b --qwen-methods sparsespec > "$OUT/qwen/throughput.log" 2>&1
grep FAILED "$OUT/qwen/throughput.log" | cut -c1-300; grep -A 3 "^| model" "$OUT/qwen/throughput.log"
python3 - "$OUT/qwen/throughput_qwen8b.json" <<'PY' 2>&1 | cut -c1-300
import json, sys
for r in json.load(open(sys.argv[1])):
    for kind, s in r["steps"].items():
        print(r["method"], kind, {k: round(v, 2) if isinstance(v, float) else v for k, v in s.items()})
PY
timeout 140 python3 benchmarks/gpu_check.py --out "$OUT/check" --fp32-only > "$OUT/check/log" 2>&1; grep -E "identical|Error" "$OUT/check/log" | cut -c1-300
