#!/usr/bin/env bash
# Session 12, call 3: (1) bf16 logits under the fused modules, folded against unfolded; (2) fp32 greedy
# identity of the random 128-dim-head Qwen3 in lockstep rounds (folded norms at 128 dims); (3) bench-code-lm
# 128 x 16k: sparsespec folded and unfolded, nospec; (4) kernels of a Qwen3-8B-shape draft step now.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/fused" "$OUT/wide" "$OUT/tp" "$OUT/qwen"
timeout 70 python3 benchmarks/gpu_check.py --out "$OUT/fused" --fused-only > "$OUT/fused/log" 2>&1; grep -E "fused modules|Error" "$OUT/fused/log" | cut -c1-300
timeout 120 python3 benchmarks/gpu_check.py --out "$OUT/wide" --wide-only > "$OUT/wide/log" 2>&1; grep -E "identical|Error" "$OUT/wide/log" | cut -c1-300
timeout 220 python3 benchmarks/throughput.py --out "$OUT/tp" --shapes 128x16384 --methods sparsespec,sparsespec_unfolded_norms,nospec > "$OUT/tp/throughput.log" 2>&1
grep FAILED "$OUT/tp/throughput.log" | cut -c1-300; grep -A 5 "^| model" "$OUT/tp/throughput.log"; grep "accepted per request" "$OUT/tp/throughput.log" | cut -c1-420
timeout 140 python3 benchmarks/profile_step.py --out "$OUT/qwen" --qwen8b --batch 64 --context 8192 --new-tokens 40 \
    --kind draft --steps 4 --skip 10 > "$OUT/qwen/log" 2>&1
grep "kernels per step\|no decode\|Error" "$OUT/qwen/log"; grep -A 20 "kernels per step" "$OUT/qwen/log" | cut -c1-130
