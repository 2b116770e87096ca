"""Where a decode iteration's device time goes: a kernel table of decode steps only.

    PYTHONPATH=. python3 benchmarks/profile_step.py --out $OUT --batch 128 --context 16384
    PYTHONPATH=. python3 benchmarks/profile_step.py --out $OUT --qwen8b --batch 32 --context 8192 --new-tokens 32 --steps 18

One generate call captures the graphs; a second runs under ``torch.profiler``, switched on for
each of the first ``--steps`` iterations without prompt rows (only those whose rows are of
``--kind``, e.g. ``verify``, if given), so prefill kernels stay out of the table. Kernels
replayed inside CUDA graphs are traced by CUPTI like launched ones; if a
run shows none (older drivers), the script profiles again with ``use_cuda_graphs=False``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import hf_sparsespec
from hf_sparsespec.generation import engine as engine_module
from hf_sparsespec.generation.request import RowKind

from benchmarks.throughput import BENCH_MODEL, prompts_for, random_qwen3_8b


def profiled_generate(model, ids, new_tokens: int, steps: int, extra: dict, kind: str | None) -> tuple[profile, dict]:
    """Profile up to ``steps`` decode iterations (of rows ``kind``, e.g. "verify" or "draft+verify",
    if given), each on its own: synchronised before and after, so the table holds their kernels alone."""
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], acc_events=True)
    original = engine_module.Engine._launch
    state = {"seen": 0, "kinds": {}}

    def launch(engine, rows):
        kinds = "+".join(sorted({row.kind.value for row in rows}))
        decoding = not any(row.kind is RowKind.PREFILL for row in rows)
        if not decoding or state["seen"] >= steps or (kind is not None and kinds != kind):
            return original(engine, rows)
        state["seen"] += 1
        state["kinds"][kinds] = state["kinds"].get(kinds, 0) + 1
        torch.cuda.synchronize()
        prof.start()
        out = original(engine, rows)
        torch.cuda.synchronize()
        prof.stop()
        return out

    engine_module.Engine._launch = launch
    try:
        generate(model, ids, new_tokens, extra)
    finally:
        engine_module.Engine._launch = original
    return prof, state


def generate(model, ids, new_tokens: int, extra: dict):
    return model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        eos_token_id=None, pad_token_id=0, do_sample=True, temperature=0.6, custom_generate=hf_sparsespec.generate,
        prefill_chunk=65536, **extra,
    )


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("profile_out"))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--new-tokens", type=int, default=160)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--speculate", type=int, default=1)
    p.add_argument("--kind", help='profile only iterations whose rows are of this kind: "draft", "verify", "draft+verify"; '
                   'several, comma-separated, make one table each')
    p.add_argument("--selection", help='a selection policy other than the default, e.g. "pillar_block"')
    p.add_argument("--qwen8b", action="store_true",
                   help="the Qwen3-8B-shaped random model, in lockstep rounds (steps are pure draft or verify)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    options = dict(speculate=bool(args.speculate))
    if args.selection:
        options["selection"] = args.selection
    if args.qwen8b:
        model = random_qwen3_8b("cuda")
        ids = torch.randint(1000, 100000, (args.batch, args.context - args.new_tokens), device="cuda")
        options.update(unified_schedule=False, delayed_verification=False, kv_memory_fraction=0.9)
    else:
        model = AutoModelForCausalLM.from_pretrained(BENCH_MODEL, dtype=torch.bfloat16).cuda().eval()
        tok = AutoTokenizer.from_pretrained(BENCH_MODEL)
        ids = prompts_for(tok, args.batch, args.context - args.new_tokens, seed=args.batch).cuda()
    model_tag = "qwen8b_" if args.qwen8b else ""
    selection_tag = f"_{args.selection}" if args.selection else ""
    # One process for every kind asked for: the model loads and the graphs are captured once.
    for kind in args.kind.split(",") if args.kind else [None]:
        kind_tag = f"_{kind.replace('+', '_')}" if kind else ""
        tag = f"{model_tag}b{args.batch}_{args.context}_{'sparsespec' if args.speculate else 'nospec'}{selection_tag}{kind_tag}"
        profile_kind(model, ids, args, options, kind, tag)


def profile_kind(model, ids, args, options: dict, kind: str | None, tag: str) -> None:
    """Write and print the kernel table of ``kind``'s decode iterations (graphs, else eager)."""
    for extra in (options, dict(options, use_cuda_graphs=False)):
        generate(model, ids, args.new_tokens, extra)  # Triton compiles and graph captures
        prof, state = profiled_generate(model, ids, args.new_tokens, args.steps, extra, kind)
        if state["seen"] == 0:
            print(f"{tag}: no decode iteration of kind {kind!r}", flush=True)
            return
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA or e.self_device_time_total > 0]
        kernels = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)
        total_us = sum(e.self_device_time_total for e in kernels)
        if total_us == 0:
            print(f"{tag}: no kernels traced with {extra}; trying the next setting", flush=True)
            continue
        rows = [{"name": e.key[:90], "calls": e.count, "us_per_step": e.self_device_time_total / state["seen"],
                 "share": e.self_device_time_total / total_us} for e in kernels[:45]]
        report = {"setting": extra, "steps": state["seen"], "step_kinds": state["kinds"],
                  "device_us_per_step": total_us / state["seen"], "kernels": rows}
        (args.out / f"profile_{tag}.json").write_text(json.dumps(report, indent=1))
        print(f"{tag} {extra}: {state['seen']} steps {state['kinds']}, {total_us / state['seen']:.0f} us of kernels per step")
        for r in rows:
            print(f"{r['us_per_step']:9.1f} us {100 * r['share']:5.1f}% x{r['calls'] / state['seen']:6.1f}  {r['name']}")
        return


if __name__ == "__main__":
    main()
