#!/usr/bin/env bash
# Session 4, second device call: which scheduler wins at batch 128 x 16k (unified over all phases,
# over 2 or 3 groups, lockstep), beside nospec, with per-kind step counts and totals; then a kernel
# profile of the default's decode steps (fused norms and rotary now in the path). Logs to $OUT.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT"
timeout 400 python3 benchmarks/throughput.py --out "$OUT" --shapes 128x16384 \
    --methods sparsespec,sparsespec_lockstep,sparsespec_2groups,sparsespec_3groups,nospec > "$OUT/throughput.log" 2>&1
grep FAILED "$OUT/throughput.log" | cut -c1-300; cat "$OUT/throughput.md"
python3 - "$OUT/throughput.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1])):
    print(r["method"], {k: (v["steps"], round(v["total_ms"]), round(v["median_ms"], 3)) for k, v in r.get("steps", {}).items()})
PY
timeout 150 python3 benchmarks/profile_step.py --out "$OUT" --speculate 1 > "$OUT/profile.log" 2>&1; grep -v -i warn "$OUT/profile.log" | head -30
