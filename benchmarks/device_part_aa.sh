#!/usr/bin/env bash
# Session 8: selection as one Triton kernel (selection_kernel.py). Correctness and time against the
# PyTorch rule at real sizes, then batch 128 x 16k with it (pillar_block, pillar), to set against
# this session's first call (device_part_z.sh: 29,900 / nospec 43,500 tokens/s).
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/sel" "$OUT/b128"
timeout 120 python3 benchmarks/kernels_check.py --out "$OUT/sel" --only selection > "$OUT/sel/log" 2>&1; grep -E "^\[(selection|error)" "$OUT/sel/log" | cut -c1-200; grep -i "error" -A5 "$OUT/sel/log" | head -20
timeout 300 python3 benchmarks/throughput.py --out "$OUT/b128" --shapes 128x16384 \
    --methods sparsespec_block,sparsespec > "$OUT/b128/throughput.log" 2>&1
grep FAILED "$OUT/b128/throughput.log" | cut -c1-300; grep -A 10 "^| model" "$OUT/b128/throughput.log"
grep -h "accepted per request" "$OUT/b128/throughput.log" | cut -c1-400
