#!/usr/bin/env bash
# One device call: end-to-end GPU check, kernel checks, bench-code-lm throughput side by side. Logs to $OUT.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if ! timeout 120 python3 benchmarks/gpu_check.py --out "$OUT" > "$OUT/gpu_check.log" 2>&1; then
    tail -30 "$OUT/gpu_check.log"; exit 1
fi
grep -v -i warn "$OUT/gpu_check.log" | tail -8
timeout 120 python3 benchmarks/kernels_check.py --out "$OUT" > "$OUT/kernels.log" 2>&1; grep -c FAIL "$OUT/kernels.log"; tail -22 "$OUT/kernels.log"
timeout ${THROUGHPUT_TIMEOUT:-300} python3 benchmarks/throughput.py --out "$OUT" ${THROUGHPUT_ARGS:-} > "$OUT/throughput.log" 2>&1
grep FAILED "$OUT/throughput.log"; tail -2 "$OUT/throughput.log"; cat "$OUT/throughput.md"
