"""Engine variants A/B in one process: bench-code-lm, alternating, after one warm-up call each.

Host speed differs between processes on the H200 machine by up to 50%, and sparsespec's tokens/s
follows it (nospec's steps are device-bound), so variants are compared within one process. A variant
is a method of ``benchmarks/throughput.py``'s ``ENGINE_METHODS``, optionally with ``@N`` for
``Engine.IN_FLIGHT = N`` (iterations in flight; default 2). Warm-ups capture the graphs, which the
engine keeps for later calls with the same settings.

    PYTHONPATH=. python3 benchmarks/one_process_ab.py --out $OUT --variants sparsespec,sparsespec_block,nospec,sparsespec,sparsespec_block,nospec
    PYTHONPATH=. python3 benchmarks/one_process_ab.py --out $OUT --variants sparsespec@2,sparsespec@3,sparsespec@2,sparsespec@3

(Session 13's call 7 ran this as ``in_flight_ab.py --order 2,3,...``, the in-flight A/B alone.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.throughput import (BENCH_MODEL, ENGINE_METHODS, StepTimer, kv_bytes_per_token, prompts_for,
                                   timed_generate, weight_bytes)
from hf_sparsespec.generation import engine as engine_module


def parse_variant(text: str) -> tuple[str, int]:
    method, _, in_flight = text.partition("@")
    if method not in ENGINE_METHODS:
        raise argparse.ArgumentTypeError(f"unknown method {method!r}; choose from {sorted(ENGINE_METHODS)}")
    return method, int(in_flight or engine_module.Engine.IN_FLIGHT)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--variants", type=lambda s: [parse_variant(v) for v in s.split(",")],
                   default=[("sparsespec", 2), ("nospec", 2)])
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(BENCH_MODEL, dtype=torch.bfloat16).cuda().eval()
    ids = prompts_for(AutoTokenizer.from_pretrained(BENCH_MODEL), args.batch, args.context - args.new_tokens, seed=args.batch).cuda()
    sampling = dict(do_sample=True, temperature=0.6)
    for method in dict.fromkeys(m for m, _ in args.variants):
        timed_generate(model, ids, args.new_tokens, method, sampling)
    rows = []
    for method, in_flight in args.variants:
        engine_module.Engine.IN_FLIGHT = in_flight
        with StepTimer() as timer:
            _, stats = timed_generate(model, ids, args.new_tokens, method, sampling)
        steps = timer.summary(kv_bytes_per_token(model), weight_bytes(model))
        row = {
            "method": method,
            "in_flight": in_flight,
            "tokens_per_s": args.batch * (args.new_tokens - 1) / steps["decode_s"],
            "mean_accepted": (stats or {}).get("mean_accepted"),
            "decode_iterations": steps.get("decode_iterations"),
            "host_ms_per_decode_iteration": steps.get("host_ms_per_decode_iteration"),
            "steps": {kind: steps[kind] for kind in ("draft", "verify", "mixed") if kind in steps},
        }
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "steps"}), flush=True)
        (args.out / "one_process_ab.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
