#!/usr/bin/env bash
# Session 7: block scores summed on tensor cores (a product with a 0/1 matrix) instead of a
# reshape-and-sum. Correctness at real sizes, the verification/unified kernel times, then batch
# 128 x 16k side by side with the per-request acceptance spread.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/sweep" "$OUT/b128"
timeout 220 python3 benchmarks/kernels_check.py --out "$OUT/sweep" --only verify-sweep > "$OUT/sweep/kernels.log" 2>&1
grep -E "^\[time\]|error|MISMATCH|passed': False" "$OUT/sweep/kernels.log" | cut -c1-150
grep -c "passed': True" "$OUT/sweep/kernels.log"
timeout 280 python3 benchmarks/throughput.py --out "$OUT/b128" --shapes 128x16384 \
    --methods sparsespec_block,sparsespec,nospec > "$OUT/b128/throughput.log" 2>&1
grep FAILED "$OUT/b128/throughput.log" | cut -c1-300; cat "$OUT/b128/throughput.md"
python3 - "$OUT/b128/throughput.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1])):
    print(r["method"], r.get("accepted_per_request"), {k: (v["steps"], round(v["total_ms"])) for k, v in r.get("steps", {}).items()})
PY
