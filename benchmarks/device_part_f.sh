#!/usr/bin/env bash
# One device call for the next session: end-to-end GPU check (fused RMSNorm now in the path), kernel
# checks, then batch 128 x 16k side by side with decode timed on the device. Logs to $OUT.
# Follow with `throughput.py --skip-bench --qwen8b` (both methods, ~5 min) in a second call.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if ! timeout 120 python3 benchmarks/gpu_check.py --out "$OUT" > "$OUT/gpu_check.log" 2>&1; then
    tail -30 "$OUT/gpu_check.log"; exit 1
fi
grep -v -i warn "$OUT/gpu_check.log" | tail -8
timeout 100 python3 benchmarks/kernels_check.py --out "$OUT" > "$OUT/kernels.log" 2>&1; grep -c FAIL "$OUT/kernels.log"; grep -A12 "== timing" "$OUT/kernels.log"
timeout 330 python3 benchmarks/throughput.py --out "$OUT" --shapes 128x16384 --methods sparsespec,nospec,window,hf_eager,hf_static \
    --static-shapes 128x16384 > "$OUT/throughput.log" 2>&1; grep FAILED "$OUT/throughput.log" | cut -c1-300; cat "$OUT/throughput.md"
