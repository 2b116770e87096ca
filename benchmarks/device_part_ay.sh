#!/usr/bin/env bash
# Session 13, call 3: early drafts (a round's first draft runs while its verification's result
# travels). (1) fp32 greedy identity under graphs and kernels: bench model default and lockstep
# rounds, the random 128-dim-head Qwen3 in lockstep rounds; (2) bench-code-lm 128 x 16k, early against
# late drafts, alternating processes (host speed varies between them), and nospec.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/check" "$OUT/tp"
timeout 200 python3 benchmarks/gpu_check.py --out "$OUT/check" --fp32-only > "$OUT/check/log" 2>&1; grep -E "identical|Error" "$OUT/check/log" | cut -c1-300
timeout 330 python3 benchmarks/throughput.py --out "$OUT/tp" --shapes 128x16384 \
    --methods sparsespec,sparsespec_late_drafts,sparsespec,sparsespec_late_drafts,nospec > "$OUT/tp/throughput.log" 2>&1
grep FAILED "$OUT/tp/throughput.log" | cut -c1-300; grep -A 7 "^| model" "$OUT/tp/throughput.log"
python3 - "$OUT/tp/throughput.json" <<'PY' 2>&1 | cut -c1-300
import json, sys
for r in json.load(open(sys.argv[1])):
    print(r["method"], round(r["tokens_per_s"]), "host", r["host_ms_per_decode_iteration"], "iters", r["decode_iterations"],
          {k: round(s["median_ms"], 3) for k, s in r["steps"].items()})
PY
