#!/usr/bin/env bash
# Session 7: where a mixed step's 2 ms go now (session 4's profile predates the tuned kernels):
# kernel time per draft+verify step at batch 128 x 16k, per-position and block scores, and per
# plain decode step, to set against the throughput run's wall time per step.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT"
timeout 110 python3 benchmarks/profile_step.py --out "$OUT" --kind draft+verify --steps 40 > "$OUT/profile_sparsespec.log" 2>&1; grep -v -i warn "$OUT/profile_sparsespec.log" | head -40 | cut -c1-120
timeout 110 python3 benchmarks/profile_step.py --out "$OUT" --kind draft+verify --steps 40 --selection pillar_block > "$OUT/profile_block.log" 2>&1; grep -v -i warn "$OUT/profile_block.log" | head -14 | cut -c1-120
timeout 90 python3 benchmarks/profile_step.py --out "$OUT" --speculate 0 --steps 40 > "$OUT/profile_nospec.log" 2>&1; grep -v -i warn "$OUT/profile_nospec.log" | head -12 | cut -c1-120
