#!/usr/bin/env bash
# One device call: Qwen3-8B-shaped system timings, the system ablation, acceptance at long contexts.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT"
timeout 190 python3 benchmarks/throughput.py --out "$OUT" --skip-bench --qwen8b > "$OUT/qwen8b.log" 2>&1; tail -2 "$OUT/qwen8b.log"; cat "$OUT/throughput_qwen8b.md"
timeout 150 python3 benchmarks/ablation.py --out "$OUT" --new-tokens 1024 > "$OUT/ablation.log" 2>&1; tail -8 "$OUT/ablation.log"
timeout ${ACCEPTANCE_TIMEOUT:-200} python3 benchmarks/acceptance.py --device cuda --out "$OUT" --tag h200_k8 --time-limit 180 ${ACCEPTANCE_ARGS:-} > "$OUT/acceptance.log" 2>&1; tail -25 "$OUT/acceptance.log"
