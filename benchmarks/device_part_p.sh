#!/usr/bin/env bash
# Next session's first device call: register caps on the attention kernel (more resident programs
# per SM for a few spills; benchmarks/kernel_registers.py) for per-position and block scores, each
# checked against the uncapped per-position kernel; then batch 128 x 16k with pillar and pillar_block
# side by side, to choose defaults from.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/sweep" "$OUT/b128"
timeout 300 python3 benchmarks/kernels_check.py --out "$OUT/sweep" --only verify-sweep > "$OUT/sweep/kernels.log" 2>&1
grep -E "^\[time\]|error|MISMATCH" "$OUT/sweep/kernels.log" | cut -c1-150
timeout 240 python3 benchmarks/throughput.py --out "$OUT/b128" --shapes 128x16384 \
    --methods sparsespec_block,sparsespec,nospec > "$OUT/b128/throughput.log" 2>&1
grep FAILED "$OUT/b128/throughput.log" | cut -c1-300; cat "$OUT/b128/throughput.md"
