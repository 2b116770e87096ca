#!/usr/bin/env bash
# Session 12, call 4: (1) fp32 greedy identity of the random 128-dim-head Qwen3 in lockstep rounds (call 3
# lost its log); (2) device time of bench-code-lm 128 x 16k mixed steps with the folded norms and without,
# from kernel tables (host speed varied by 50% between call 3's processes, which decides its tokens/s).
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/wide" "$OUT/prof"
timeout 150 python3 benchmarks/gpu_check.py --out "$OUT/wide" --wide-only > "$OUT/wide/wide.log" 2>&1; grep -v "it/s\]" "$OUT/wide/wide.log" | tail -4 | cut -c1-300
for flag in "" --unfolded-norms; do
  timeout 130 python3 benchmarks/profile_step.py --out "$OUT/prof" --batch 128 --context 16384 --new-tokens 160 \
      --kind draft+verify --steps 8 --skip 30 $flag > "$OUT/prof/log$flag" 2>&1
  grep "kernels per step\|no decode\|Error" "$OUT/prof/log$flag"; grep -A 12 "kernels per step" "$OUT/prof/log$flag" | cut -c1-120
done
