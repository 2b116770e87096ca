#!/usr/bin/env bash
# Session 7: the score pass as its own kernel (over row x KV head x 512-position chunks) instead of
# the finish kernel's tail. Correctness checks at real sizes, verification/unified kernel times
# (score pass sizes, 64-row tiles with and without scores), then batch 128 x 16k side by side.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/sweep" "$OUT/b128"
timeout 240 python3 benchmarks/kernels_check.py --out "$OUT/sweep" --only verify-sweep > "$OUT/sweep/kernels.log" 2>&1
grep -E "^\[time\]|error|MISMATCH|passed': False" "$OUT/sweep/kernels.log" | cut -c1-150
grep -c "passed': True" "$OUT/sweep/kernels.log"
timeout 300 python3 benchmarks/throughput.py --out "$OUT/b128" --shapes 128x16384 \
    --methods sparsespec,sparsespec_block,nospec > "$OUT/b128/throughput.log" 2>&1
grep FAILED "$OUT/b128/throughput.log" | cut -c1-300; cat "$OUT/b128/throughput.md"
python3 - "$OUT/b128/throughput.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1])):
    print(r["method"], {k: (v["steps"], round(v["total_ms"])) for k, v in r.get("steps", {}).items()})
PY
