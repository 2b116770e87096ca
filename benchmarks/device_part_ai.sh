#!/usr/bin/env bash
# Session 9, second call: (1) fp32 greedy identity with the fused projections, gated MLP kernel,
# one-launch rotary and strided per-head norms; (2) batch 128 x 16k: the unified default, lockstep
# rounds (whole-round draft bursts) and nospec; (3) query tiles for a 128-row lockstep verification.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/check" "$OUT/tp" "$OUT/tiles"
timeout 150 python3 benchmarks/gpu_check.py --out "$OUT/check" --fp32-only > "$OUT/check/log" 2>&1; grep -E "identical|Error" "$OUT/check/log" | cut -c1-300
timeout 250 python3 benchmarks/throughput.py --out "$OUT/tp" --shapes 128x16384 \
    --methods sparsespec,nospec,sparsespec_block_lockstep > "$OUT/tp/throughput.log" 2>&1
grep FAILED "$OUT/tp/throughput.log" | cut -c1-300; grep -A 6 "^| model" "$OUT/tp/throughput.log"; grep "accepted per request" "$OUT/tp/throughput.log" | cut -c1-420
timeout 80 python3 benchmarks/kernels_check.py --out "$OUT/tiles" --only lockstep-tiles > "$OUT/tiles/log" 2>&1; grep "\[time\]\|error" "$OUT/tiles/log" | cut -c1-200
