#!/usr/bin/env bash
# Session 6, third device call, with the register caps now default (16-row attention tiles <= 96,
# their finish kernel <= 168): batch 128 x 16k side by side (pillar, pillar_block, nospec), the
# Qwen3-8B shape's sparsespec steps (its nospec ran in device_part_q.sh, with a cap of 128), then
# tile and split knobs for the bench-code-lm heads (`kernels_check.py --only tuning`).
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/b128" "$OUT/qwen" "$OUT/tuning"
timeout 200 python3 benchmarks/throughput.py --out "$OUT/b128" --shapes 128x16384 \
    --methods sparsespec_block,sparsespec,nospec > "$OUT/b128/throughput.log" 2>&1
grep FAILED "$OUT/b128/throughput.log" | cut -c1-300; cat "$OUT/b128/throughput.md"
timeout 200 python3 benchmarks/throughput.py --out "$OUT/qwen" --skip-bench --qwen8b --qwen-methods sparsespec > "$OUT/qwen/qwen8b.log" 2>&1
grep FAILED "$OUT/qwen/qwen8b.log" | cut -c1-300; cat "$OUT/qwen/throughput_qwen8b.md"
python3 -c "
import json; [print(r['method'], r.get('steps')) for r in json.load(open('$OUT/qwen/throughput_qwen8b.json'))]"
timeout 180 python3 benchmarks/kernels_check.py --out "$OUT/tuning" --only tuning > "$OUT/tuning/kernels.log" 2>&1
grep -E "^\[time\]|error|MISMATCH" "$OUT/tuning/kernels.log" | cut -c1-150
