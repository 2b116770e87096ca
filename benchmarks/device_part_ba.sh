#!/usr/bin/env bash
# Session 13, call 5: bench-code-lm 128 x 16k, early against late drafts, three alternating pairs of
# processes (host speed differs between processes by up to 50%, call 3).
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/tp"
timeout 470 python3 benchmarks/throughput.py --out "$OUT/tp" --shapes 128x16384 \
    --methods sparsespec_late_drafts,sparsespec,sparsespec_late_drafts,sparsespec,sparsespec_late_drafts,sparsespec \
    > "$OUT/tp/throughput.log" 2>&1
grep FAILED "$OUT/tp/throughput.log" | cut -c1-300
python3 - "$OUT/tp/throughput.json" <<'PY' 2>&1 | cut -c1-300
import json, sys
for r in json.load(open(sys.argv[1])):
    print(r["method"], round(r["tokens_per_s"]), "acc", round(r["mean_accepted"], 2), "host", round(r["host_ms_per_decode_iteration"], 3),
          "iters", r["decode_iterations"], {k: (round(s["median_ms"], 3), s["steps"]) for k, s in r["steps"].items()})
PY
