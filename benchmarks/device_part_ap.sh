#!/usr/bin/env bash
# Session 11, call 1: (1) how draft rows' KV is cut into work items, and the same knobs for a
# Qwen3-8B-shape verification-only step (kernels_check --only draft-splits); (2) kernel tables of
# representative Qwen3-8B-shape steps at 64 x 8k in lockstep rounds: the first round (whose drafts,
# before any verification, are full rows) is let pass.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/splits" "$OUT/qwen"
timeout 250 python3 benchmarks/kernels_check.py --out "$OUT/splits" --only draft-splits > "$OUT/splits/log" 2>&1
grep -v "^\[time\]" "$OUT/splits/log" | grep -i "error\|mismatch" | cut -c1-200; tail -40 "$OUT/splits/log" | cut -c1-130
timeout 230 python3 benchmarks/profile_step.py --out "$OUT/qwen" --qwen8b --batch 64 --context 8192 --new-tokens 72 \
    --kind verify,draft --steps 4 --skip 10 > "$OUT/qwen/log" 2>&1
grep "kernels per step\|no decode\|Error" "$OUT/qwen/log"; grep -A 24 "kernels per step" "$OUT/qwen/log" | cut -c1-130
