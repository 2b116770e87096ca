#!/usr/bin/env bash
# Session 6, second device call: 16-row decode tiles now capped at 128 registers by default; the
# sweep times the default against uncapped and 96-register kernels (decode, draft, verification,
# unified steps; finish kernel capped at 168), tuning knobs on the bench-code-lm heads, then the
# Qwen3-8B shape's steps with the new default.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/sweep" "$OUT/qwen"
timeout 330 python3 benchmarks/kernels_check.py --out "$OUT/sweep" --only verify-sweep > "$OUT/sweep/kernels.log" 2>&1
grep -E "^\[time\]|error|MISMATCH" "$OUT/sweep/kernels.log" | cut -c1-150
timeout 220 python3 benchmarks/throughput.py --out "$OUT/qwen" --skip-bench --qwen8b > "$OUT/qwen/qwen8b.log" 2>&1
grep FAILED "$OUT/qwen/qwen8b.log" | cut -c1-300; cat "$OUT/qwen/throughput_qwen8b.md"
python3 -c "
import json; [print(r['method'], r.get('steps')) for r in json.load(open('$OUT/qwen/throughput_qwen8b.json'))]"
