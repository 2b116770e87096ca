#!/usr/bin/env bash
# Next session's first device call: query-tile sweep for verification rows (block_m x pipeline
# stages; decides the tile policy for verification-heavy steps), then the Qwen3-8B shape again with
# the finer token buckets (e5f6bde: a 64 x 9 verification no longer pads to 1,024 tokens).
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/sweep" "$OUT/qwen"
timeout 300 python3 benchmarks/kernels_check.py --out "$OUT/sweep" --only verify-sweep > "$OUT/sweep/kernels.log" 2>&1
grep -E "^\[time\]|error|MISMATCH" "$OUT/sweep/kernels.log" | cut -c1-160
timeout 270 python3 benchmarks/throughput.py --out "$OUT/qwen" --skip-bench --qwen8b > "$OUT/qwen/qwen8b.log" 2>&1
grep FAILED "$OUT/qwen/qwen8b.log" | cut -c1-300; cat "$OUT/qwen/throughput_qwen8b.md"
python3 -c "
import json; [print(r['method'], r.get('steps')) for r in json.load(open('$OUT/qwen/throughput_qwen8b.json'))]"
