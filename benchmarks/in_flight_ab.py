"""Iterations in flight (``Engine.IN_FLIGHT``) A/B in one process: bench-code-lm, sparsespec.

Host speed differs between processes on the H200 machine by up to 50%, and sparsespec's tokens/s
follows it, so variants of the host loop are compared within one process, alternating, after one
warm-up call (which captures the graphs every variant then shares).

    PYTHONPATH=. python3 benchmarks/in_flight_ab.py --out $OUT --batch 128 --context 16384 --order 2,3,2,3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.throughput import BENCH_MODEL, StepTimer, kv_bytes_per_token, prompts_for, timed_generate, weight_bytes
from hf_sparsespec.generation import engine as engine_module


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--order", type=lambda s: [int(v) for v in s.split(",")], default=[2, 3, 2, 3])
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(BENCH_MODEL, dtype=torch.bfloat16).cuda().eval()
    ids = prompts_for(AutoTokenizer.from_pretrained(BENCH_MODEL), args.batch, args.context - args.new_tokens, seed=args.batch).cuda()
    sampling = dict(do_sample=True, temperature=0.6)
    timed_generate(model, ids, args.new_tokens, "sparsespec", sampling)  # warm-up: captures
    rows = []
    for in_flight in args.order:
        engine_module.Engine.IN_FLIGHT = in_flight
        with StepTimer() as timer:
            _, stats = timed_generate(model, ids, args.new_tokens, "sparsespec", sampling)
        steps = timer.summary(kv_bytes_per_token(model), weight_bytes(model))
        row = {
            "in_flight": in_flight,
            "tokens_per_s": args.batch * (args.new_tokens - 1) / steps["decode_s"],
            "mean_accepted": stats["mean_accepted"],
            "decode_iterations": steps.get("decode_iterations"),
            "host_ms_per_decode_iteration": steps.get("host_ms_per_decode_iteration"),
            "steps": {kind: steps[kind] for kind in ("draft", "verify", "mixed") if kind in steps},
        }
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "steps"}), flush=True)
        (args.out / "in_flight_ab.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
