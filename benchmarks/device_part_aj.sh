#!/usr/bin/env bash
# Prepared in session 9 for the next session's first call. In session 9's second call (device_part_ai.sh,
# with the fused projections, gated-MLP kernel, one-launch rotary) sparsespec ran 28.9k tokens/s at 128 x
# 16k (mixed step median 2.27 ms) against 35.5k in its first call (1.94 ms), while nospec went 43.1k ->
# 44.7k. (1) A/B of fused_linear in one call, with the host's own ms per decode iteration (does the host
# set the pace?); (2) the kernel table of a pure draft step with today's defaults (launch count).
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/ab" "$OUT/profile"
timeout 330 python3 benchmarks/throughput.py --out "$OUT/ab" --shapes 128x16384 \
    --methods sparsespec,sparsespec_unfused_linear,nospec,nospec_unfused_linear > "$OUT/ab/throughput.log" 2>&1
grep FAILED "$OUT/ab/throughput.log" | cut -c1-300; grep -A 7 "^| model" "$OUT/ab/throughput.log"; grep "accepted per request" "$OUT/ab/throughput.log" | cut -c1-420
timeout 150 python3 benchmarks/profile_step.py --out "$OUT/profile" --batch 128 --context 16384 --kind draft \
    --steps 30 > "$OUT/profile/log" 2>&1; head -30 "$OUT/profile/log" | cut -c1-160
