"""Ablation of the system pieces, as in the paper: add one at a time to naive sparse self-speculation.

    PYTHONPATH=. python3 benchmarks/ablation.py --out $OUT

Every configuration decodes the same requests under the same KV memory budget (``--pool-fraction``
of what all requests would need at their full length):
1. naive: lockstep rounds, results read synchronously, KV reserved up front for each request's
   whole output (so the budget caps how many run at once), no offload;
2. + unified scheduler (requests staggered over draft phases);
3. + dynamic KV management (admit everyone, grow pages on demand, offload to host under pressure);
4. + delayed verification (results absorbed one iteration late, overlapping host and device).

A last row repeats step 4 with three iterations in flight instead of two (``Engine.IN_FLIGHT``; the
engine ran that way until session 3), where a verified request sits out two iterations.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_sparsespec
from hf_sparsespec.generation.engine import Engine
from throughput import BENCH_MODEL, prompts_for

# (name, generate options, KV reserved up front, iterations in flight)
STEPS = [
    ("naive", dict(unified_schedule=False, delayed_verification=False, offload=False), True, Engine.IN_FLIGHT),
    ("+unified scheduler", dict(unified_schedule=True, delayed_verification=False, offload=False), True, Engine.IN_FLIGHT),
    ("+KV management", dict(unified_schedule=True, delayed_verification=False, offload=True), False, Engine.IN_FLIGHT),
    ("+delayed verification", dict(unified_schedule=True, delayed_verification=True, offload=True), False, Engine.IN_FLIGHT),
    ("(3 in flight)", dict(unified_schedule=True, delayed_verification=True, offload=True), False, 3),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=2048)
    p.add_argument("--pool-fraction", type=float, default=0.5)
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    model = AutoModelForCausalLM.from_pretrained(BENCH_MODEL, dtype=torch.bfloat16).to(args.device).eval()
    tok = AutoTokenizer.from_pretrained(BENCH_MODEL)
    ids = prompts_for(tok, args.requests, args.prompt_len, seed=0).to(args.device)
    full_len = args.prompt_len + args.new_tokens + 16
    pool = int(args.pool_fraction * args.requests * full_len)
    common = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                  min_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0, do_sample=True, temperature=0.6,
                  custom_generate=hf_sparsespec.generate, return_dict_in_generate=True, kv_pool_tokens=pool,
                  prefill_chunk=16384)
    rows = []
    # Warm-up: kernels compile and graphs are captured once, outside the timings.
    model.generate(**{**common, "max_new_tokens": 32, "min_new_tokens": 32})
    default_in_flight = Engine.IN_FLIGHT
    for name, knobs, static_reservation, in_flight in STEPS:
        batch = max(1, pool // full_len) if static_reservation else args.requests
        if torch.device(args.device).type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        Engine.IN_FLIGHT = in_flight
        try:
            out = model.generate(**common, **knobs, max_batch_size=batch)
        finally:
            Engine.IN_FLIGHT = default_in_flight
        if torch.device(args.device).type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        stats = out.spec_stats
        row = dict(step=name, max_batch_size=batch, kv_pool_tokens=pool, seconds=seconds,
                   tokens_per_s=args.requests * args.new_tokens / seconds, mean_accepted=stats["mean_accepted"],
                   num_offloads=stats["num_offloads"], forward_passes=stats["num_forward_passes"], in_flight=in_flight, **knobs)
        row["speedup_vs_previous"] = rows[-1]["seconds"] / seconds if rows else 1.0
        row["speedup_vs_naive"] = rows[0]["seconds"] / seconds if rows else 1.0
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablation.json").write_text(json.dumps(rows, indent=1))
    lines = ["| step | max batch | tokens/s | mean accepted | offloads | vs previous | vs naive |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['max_batch_size']} | {r['tokens_per_s']:.0f} | {r['mean_accepted']:.2f} | "
              f"{r['num_offloads']} | {r['speedup_vs_previous']:.2f}x | {r['speedup_vs_naive']:.2f}x |" for r in rows]
    (args.out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
