#!/usr/bin/env bash
# One device call: GPU checks, kernel checks, bench-code-lm throughput side by side. Logs to $OUT.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT"
timeout 100 python3 benchmarks/gpu_check.py --out "$OUT" > "$OUT/gpu_check.log" 2>&1; grep -v -i warn "$OUT/gpu_check.log" | tail -8
timeout 130 python3 benchmarks/kernels_check.py --out "$OUT" > "$OUT/kernels.log" 2>&1; tail -22 "$OUT/kernels.log"
timeout ${THROUGHPUT_TIMEOUT:-300} python3 benchmarks/throughput.py --out "$OUT" ${THROUGHPUT_ARGS:-} > "$OUT/throughput.log" 2>&1
tail -3 "$OUT/throughput.log"; cat "$OUT/throughput.md"
