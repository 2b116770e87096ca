#!/usr/bin/env bash
# Session 5, second device call: verification rows in a launch of their own (64-row tiles, one KV
# read per row): end-to-end GPU check, the tile sweep against the one-launch kernel, the Qwen3-8B
# shape with per-step floor ratios.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/sweep" "$OUT/qwen"
if ! timeout 150 python3 benchmarks/gpu_check.py --out "$OUT" > "$OUT/gpu_check.log" 2>&1; then
    tail -30 "$OUT/gpu_check.log"; exit 1
fi
grep -E "identical|prefix|sync warnings" "$OUT/gpu_check.log"
timeout 190 python3 benchmarks/kernels_check.py --out "$OUT/sweep" --only verify-sweep > "$OUT/sweep/kernels.log" 2>&1
grep -E "^\[time\]|error|MISMATCH" "$OUT/sweep/kernels.log" | cut -c1-150
timeout 240 python3 benchmarks/throughput.py --out "$OUT/qwen" --skip-bench --qwen8b > "$OUT/qwen/qwen8b.log" 2>&1
grep FAILED "$OUT/qwen/qwen8b.log" | cut -c1-300; cat "$OUT/qwen/throughput_qwen8b.md"
python3 -c "
import json; [print(r['method'], r.get('steps')) for r in json.load(open('$OUT/qwen/throughput_qwen8b.json'))]"
