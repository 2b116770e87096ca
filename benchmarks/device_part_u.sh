#!/usr/bin/env bash
# Prepared in session 6 for the next session's first device call: verification tiles again (64-row
# tiles against the tuned 16-row ones; scores per position, per block, none; register caps with
# 128-position blocks), then batch 128 x 16k with each run's per-request acceptance spread
# (`accepted_per_request`), adaptive draft length included: is the run-to-run spread the tail of a
# few low-acceptance requests?
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/sweep" "$OUT/b128"
timeout 230 python3 benchmarks/kernels_check.py --out "$OUT/sweep" --only verify-sweep > "$OUT/sweep/kernels.log" 2>&1
grep -E "^\[time\]|error|MISMATCH" "$OUT/sweep/kernels.log" | cut -c1-150
timeout 330 python3 benchmarks/throughput.py --out "$OUT/b128" --shapes 128x16384 \
    --methods sparsespec_block,sparsespec,sparsespec_adaptive,nospec > "$OUT/b128/throughput.log" 2>&1
grep FAILED "$OUT/b128/throughput.log" | cut -c1-300; cat "$OUT/b128/throughput.md"
python3 - "$OUT/b128/throughput.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1])):
    print(r["method"], r.get("accepted_per_request"), {k: (v["steps"], round(v["total_ms"])) for k, v in r.get("steps", {}).items()})
PY
