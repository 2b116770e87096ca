#!/usr/bin/env bash
# One device call: kernel checks (correctness at real sizes, timings), bench-code-lm sparsespec and
# nospec side by side at batch 128 x 16k, Qwen3-8B-shaped sparsespec step timings. Logs to $OUT.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT"
timeout 100 python3 benchmarks/kernels_check.py --out "$OUT" > "$OUT/kernels.log" 2>&1; grep -c FAIL "$OUT/kernels.log"; grep -A12 "== timing" "$OUT/kernels.log"
timeout 150 python3 benchmarks/throughput.py --out "$OUT" --shapes 128x16384 --methods sparsespec,nospec > "$OUT/throughput.log" 2>&1; grep FAILED "$OUT/throughput.log" | cut -c1-300; cat "$OUT/throughput.md"
timeout ${QWEN_TIMEOUT:-170} python3 benchmarks/throughput.py --out "$OUT/qwen" --skip-bench --qwen8b --qwen-methods sparsespec > "$OUT/qwen8b.log" 2>&1; grep -i "fail\|error" "$OUT/qwen8b.log" | cut -c1-300; cat "$OUT/qwen/throughput_qwen8b.md"
