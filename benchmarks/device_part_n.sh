#!/usr/bin/env bash
# Session 5, fourth device call: block scores summed by a 0/1 matrix product, only in scored rows' programs.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/sweep"
timeout 170 python3 benchmarks/kernels_check.py --out "$OUT/sweep" --only verify-sweep > "$OUT/sweep/kernels.log" 2>&1
grep -E "^\[time\]|error|MISMATCH" "$OUT/sweep/kernels.log" | cut -c1-150
