#!/usr/bin/env bash
# Session 12, call 1: the Qwen3-8B-shape decode GEMMs at 64 rows, cuBLAS against the split-K Triton
# kernel over its configurations (benchmarks/gemm_check.py).
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/gemm"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
timeout 480 python3 benchmarks/gemm_check.py --out "$OUT/gemm" --rows 64 > "$OUT/gemm/log" 2>&1
grep -v "^\[" "$OUT/gemm/log" | cut -c1-200 | tail -60
