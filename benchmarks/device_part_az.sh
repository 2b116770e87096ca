#!/usr/bin/env bash
# Session 13, call 4: (1) fp32 greedy identity of the random 128-dim-head Qwen3 in lockstep rounds with
# early drafts (call 3's ran past its timeout); (2) the Qwen3-8B shape at batch 64 x 8k, lockstep rounds:
# ms per draft and verification step against their floors, at this commit.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/wide" "$OUT/qwen"
timeout 280 python3 benchmarks/gpu_check.py --out "$OUT/wide" --wide-only > "$OUT/wide/wide.log" 2>&1; echo "wide rc=$?"
grep -v "it/s\]" "$OUT/wide/wide.log" | tail -3 | cut -c1-300
timeout 250 python3 benchmarks/throughput.py --out "$OUT/qwen" --skip-bench --qwen8b --qwen-methods sparsespec > "$OUT/qwen/throughput.log" 2>&1
grep FAILED "$OUT/qwen/throughput.log" | cut -c1-300
python3 - "$OUT/qwen/throughput_qwen8b.json" <<'PY' 2>&1 | cut -c1-300
import json, sys
for r in json.load(open(sys.argv[1])):
    for kind, s in r["steps"].items():
        print(r["method"], kind, {k: round(v, 2) if isinstance(v, float) else v for k, v in s.items()})
PY
