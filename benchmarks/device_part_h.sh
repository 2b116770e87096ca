#!/usr/bin/env bash
# Session 4, third device call: adaptive draft length at batch 128 x 16k beside the default and
# nospec (one run, side by side), then the Qwen3-8B shape (lockstep, synchronous verification).
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/b128" "$OUT/qwen"
timeout 300 python3 benchmarks/throughput.py --out "$OUT/b128" --shapes 128x16384 \
    --methods sparsespec_adaptive,sparsespec_adaptive_2groups,sparsespec,nospec > "$OUT/b128/throughput.log" 2>&1
grep FAILED "$OUT/b128/throughput.log" | cut -c1-300; cat "$OUT/b128/throughput.md"
python3 - "$OUT/b128/throughput.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1])):
    print(r["method"], {k: (v["steps"], round(v["total_ms"]), round(v["median_ms"], 3)) for k, v in r.get("steps", {}).items()})
PY
timeout 270 python3 benchmarks/throughput.py --out "$OUT/qwen" --skip-bench --qwen8b > "$OUT/qwen/qwen8b.log" 2>&1
grep FAILED "$OUT/qwen/qwen8b.log" | cut -c1-300; cat "$OUT/qwen/throughput_qwen8b.md"
grep '"method"' "$OUT/qwen/throughput_qwen8b.json" -A0 | head; python3 -c "
import json; [print(r['method'], r.get('draft_floor_ms'), r.get('verify_floor_ms'), r.get('steps')) for r in json.load(open('$OUT/qwen/throughput_qwen8b.json'))]"
