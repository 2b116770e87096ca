#!/usr/bin/env bash
# Session 5, third device call: PillarAttn scores at 16-token block granularity, summed inside the
# attention pass (selection="pillar_block"): the kernel cost against the per-position score pass
# (checked against its block sums), then batch 128 x 16k side by side with the default and nospec,
# then the Qwen3-8B shape's steps with block scores.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/sweep" "$OUT/b128" "$OUT/qwen"
timeout 150 python3 benchmarks/kernels_check.py --out "$OUT/sweep" --only verify-sweep > "$OUT/sweep/kernels.log" 2>&1
grep -E "^\[time\]|error|MISMATCH" "$OUT/sweep/kernels.log" | cut -c1-150
timeout 230 python3 benchmarks/throughput.py --out "$OUT/b128" --shapes 128x16384 \
    --methods sparsespec_block,sparsespec,nospec > "$OUT/b128/throughput.log" 2>&1
grep FAILED "$OUT/b128/throughput.log" | cut -c1-300; cat "$OUT/b128/throughput.md"
python3 - "$OUT/b128/throughput.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1])):
    print(r["method"], {k: (v["steps"], round(v["total_ms"]), round(v["median_ms"], 3)) for k, v in r.get("steps", {}).items()})
PY
timeout 200 python3 benchmarks/throughput.py --out "$OUT/qwen" --skip-bench --qwen8b --qwen-methods sparsespec_block > "$OUT/qwen/qwen8b.log" 2>&1
grep FAILED "$OUT/qwen/qwen8b.log" | cut -c1-300; cat "$OUT/qwen/throughput_qwen8b.md"
python3 -c "
import json; [print(r['method'], r.get('steps')) for r in json.load(open('$OUT/qwen/throughput_qwen8b.json'))]"
