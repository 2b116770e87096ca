#!/usr/bin/env bash
# Session 11, call 4: draft-only steps past 64 dims take 64-position blocks (call 3's ncu: 3 programs per
# SM for 512 items). (1) kernel A/B: the draft block, finish-kernel register caps for bench heads;
# (2) the Qwen3-8B shape end to end; (3) bench-code-lm 128 x 16k, sparsespec and nospec side by side.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/splits" "$OUT/qwen" "$OUT/tp"
timeout 120 python3 benchmarks/kernels_check.py --out "$OUT/splits" --only draft-splits > "$OUT/splits/log" 2>&1
grep -v "^\[time\]" "$OUT/splits/log" | grep -i "error\|mismatch" | cut -c1-200; grep -A 14 "^case " "$OUT/splits/log" | cut -c1-130
timeout 170 python3 benchmarks/throughput.py --out "$OUT/qwen" --skip-bench --qwen8b --qwen-methods sparsespec > "$OUT/qwen/throughput.log" 2>&1
grep FAILED "$OUT/qwen/throughput.log" | cut -c1-300
python3 - "$OUT/qwen/throughput_qwen8b.json" <<'PY' 2>&1 | cut -c1-300
import json, sys
for r in json.load(open(sys.argv[1])):
    for kind, s in r["steps"].items():
        print(r["method"], kind, {k: round(v, 2) if isinstance(v, float) else v for k, v in s.items()})
PY
timeout 150 python3 benchmarks/throughput.py --out "$OUT/tp" --shapes 128x16384 --methods sparsespec,nospec > "$OUT/tp/throughput.log" 2>&1
grep FAILED "$OUT/tp/throughput.log" | cut -c1-300; grep -A 4 "^| model" "$OUT/tp/throughput.log"; grep "accepted per request" "$OUT/tp/throughput.log" | cut -c1-420
