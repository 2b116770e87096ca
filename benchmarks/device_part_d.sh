#!/usr/bin/env bash
# One device call: kernel profiles of decode steps at batch 128 x 16k (sparsespec, nospec) and the
# Qwen3-8B-shaped step timings. Logs to $OUT.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT"
timeout 120 python3 benchmarks/profile_step.py --out "$OUT" --speculate 1 > "$OUT/profile_sparsespec.log" 2>&1; grep -v -i warn "$OUT/profile_sparsespec.log" | head -32
timeout 110 python3 benchmarks/profile_step.py --out "$OUT" --speculate 0 > "$OUT/profile_nospec.log" 2>&1; grep -v -i warn "$OUT/profile_nospec.log" | head -20
timeout 250 python3 benchmarks/throughput.py --out "$OUT" --skip-bench --qwen8b > "$OUT/qwen8b.log" 2>&1; grep -i "fail\|error" "$OUT/qwen8b.log" | cut -c1-300; cat "$OUT/throughput_qwen8b.md"
