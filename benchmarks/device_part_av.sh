#!/usr/bin/env bash
# Session 12, call 2: Qwen3's q/k norms folded into the rotary kernel and the residual adds into the
# norms after them. (1) bf16 logits under the fused modules and fp32 greedy identity (bench model,
# default and lockstep rounds; random 128-dim-head Qwen3 in lockstep rounds); (2) the Qwen3-8B shape,
# folded against unfolded, in one process; (3) bench-code-lm 128 x 16k, sparsespec and nospec.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/check" "$OUT/qwen" "$OUT/tp"
timeout 130 python3 benchmarks/gpu_check.py --out "$OUT/check" --fp32-only > "$OUT/check/log" 2>&1; grep -E "identical|Error|fused modules" "$OUT/check/log" | cut -c1-400
timeout 210 python3 benchmarks/throughput.py --out "$OUT/qwen" --skip-bench --qwen8b --qwen-methods sparsespec,sparsespec_unfolded_norms > "$OUT/qwen/throughput.log" 2>&1
grep FAILED "$OUT/qwen/throughput.log" | cut -c1-300
python3 - "$OUT/qwen/throughput_qwen8b.json" <<'PY' 2>&1 | cut -c1-300
import json, sys
for r in json.load(open(sys.argv[1])):
    for kind, s in r["steps"].items():
        print(r["method"], kind, {k: round(v, 2) if isinstance(v, float) else v for k, v in s.items()})
PY
timeout 150 python3 benchmarks/throughput.py --out "$OUT/tp" --shapes 128x16384 --methods sparsespec,nospec > "$OUT/tp/throughput.log" 2>&1
grep FAILED "$OUT/tp/throughput.log" | cut -c1-300; grep -A 4 "^| model" "$OUT/tp/throughput.log"; grep "accepted per request" "$OUT/tp/throughput.log" | cut -c1-420
