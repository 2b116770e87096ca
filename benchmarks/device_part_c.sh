#!/usr/bin/env bash
# One device call when little device time is left: throughput, ablation and acceptance, each capped.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT"
timeout 230 python3 benchmarks/throughput.py --out "$OUT" --shapes ${SHAPES:-128x2048,16x2048,1x2048,128x8192} \
    --methods sparsespec,nospec,window,hf_static,hf_eager --static-shapes 128x2048 > "$OUT/throughput.log" 2>&1
grep FAILED "$OUT/throughput.log" | cut -c1-200; cat "$OUT/throughput.md"
timeout 130 python3 benchmarks/ablation.py --out "$OUT" --new-tokens 512 > "$OUT/ablation.log" 2>&1; tail -7 "$OUT/ablation.log"
timeout 150 python3 benchmarks/acceptance.py --device cuda --out "$OUT" --tag h200_k8 --time-limit 120 > "$OUT/acceptance.log" 2>&1; tail -22 "$OUT/acceptance.log"
