"""Where a decode iteration's device time goes: a kernel table of decode steps only.

    PYTHONPATH=. python3 benchmarks/profile_step.py --out $OUT --batch 128 --context 16384
    PYTHONPATH=. python3 benchmarks/profile_step.py --out $OUT --qwen8b --batch 32 --context 8192 --new-tokens 72 --kind verify,draft --steps 4 --skip 10

One generate call captures the graphs; a second runs under ``torch.profiler``, switched on for
each of the first ``--steps`` iterations without prompt rows (after ``--skip`` such iterations;
per kind of ``--kind``, e.g. ``verify,draft``, if given: one table each), so prefill kernels stay
out of the tables. Kernels
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

from benchmarks.throughput import BENCH_MODEL, _variant, prompts_for, random_qwen3_8b


def profiled_generate(model, ids, new_tokens: int, steps: int, skip: int, extra: dict,
                      kinds: list[str | None]) -> dict[str | None, tuple[profile, int]]:
    """Profile up to ``steps`` decode iterations of each of ``kinds`` (a row-kind set such as
    "verify" or "draft+verify"; None: any), after letting the first ``skip`` decode iterations pass,
    each on its own: synchronised before and after, so a table holds its iterations' kernels alone.
    One profiler per kind, so one generate call serves every table."""
    profilers = {kind: profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], acc_events=True) for kind in kinds}
    seen = dict.fromkeys(kinds, 0)
    passed = 0
    original = engine_module.Engine._launch

    def launch(engine, rows):
        nonlocal passed
        if any(row.kind is RowKind.PREFILL for row in rows):
            return original(engine, rows)
        passed += 1
        kinds_here = "+".join(sorted({row.kind.value for row in rows}))
        kind = kinds_here if kinds_here in seen else None
        if passed <= skip or kind not in seen or seen[kind] >= steps:
            return original(engine, rows)
        seen[kind] += 1
        torch.cuda.synchronize()
        profilers[kind].start()
        out = original(engine, rows)
        torch.cuda.synchronize()
        profilers[kind].stop()
        return out

    engine_module.Engine._launch = launch
    try:
        generate(model, ids, new_tokens, extra)
    finally:
        engine_module.Engine._launch = original
    return {kind: (profilers[kind], seen[kind]) for kind in kinds}


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
    p.add_argument("--steps", type=int, default=60, help="iterations profiled per kind")
    p.add_argument("--skip", type=int, default=0,
                   help="decode iterations to let pass first, e.g. a lockstep batch's first round, whose drafts "
                   "(before any verification) are full rows")
    p.add_argument("--speculate", type=int, default=1)
    p.add_argument("--kind", help='profile only iterations whose rows are of this kind: "draft", "verify", "draft+verify"; '
                   'several, comma-separated, make one table each')
    p.add_argument("--selection", help='a selection policy other than the default, e.g. "pillar_block"')
    p.add_argument("--unfolded-norms", action="store_true",
                   help="without the q/k norms and residual adds folded into other kernels (as before session 12)")
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
    selection_tag = (f"_{args.selection}" if args.selection else "") + ("_unfolded_norms" if args.unfolded_norms else "")
    kinds = args.kind.split(",") if args.kind else [None]
    tags = {kind: f"{model_tag}b{args.batch}_{args.context}_{'sparsespec' if args.speculate else 'nospec'}{selection_tag}"
                  + (f"_{kind.replace('+', '_')}" if kind else "") for kind in kinds}
    for extra in (options, dict(options, use_cuda_graphs=False)):
        with _variant("sparsespec_unfolded_norms" if args.unfolded_norms else "sparsespec"):
            generate(model, ids, args.new_tokens, extra)  # Triton compiles and graph captures
            profiles = profiled_generate(model, ids, args.new_tokens, args.steps, args.skip, extra, kinds)
        if all(write_table(prof, seen, tags[kind], kind, extra, args.out) for kind, (prof, seen) in profiles.items()):
            return


def write_table(prof: profile, seen: int, tag: str, kind: str | None, extra: dict, out: Path) -> bool:
    """Write and print one kind's kernel table; False if the profile traced no kernels (then the
    caller tries again without graphs)."""
    if seen == 0:
        print(f"{tag}: no decode iteration of kind {kind!r}", flush=True)
        return True
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA or e.self_device_time_total > 0]
    kernels = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)
    total_us = sum(e.self_device_time_total for e in kernels)
    if total_us == 0:
        print(f"{tag}: no kernels traced with {extra}; trying the next setting", flush=True)
        return False
    rows = [{"name": e.key[:90], "calls": e.count, "us_per_step": e.self_device_time_total / seen,
             "share": e.self_device_time_total / total_us} for e in kernels[:45]]
    report = {"setting": extra, "steps": seen, "device_us_per_step": total_us / seen, "kernels": rows}
    (out / f"profile_{tag}.json").write_text(json.dumps(report, indent=1))
    print(f"{tag} {extra}: {seen} steps, {total_us / seen:.0f} us of kernels per step")
    for r in rows:
        print(f"{r['us_per_step']:9.1f} us {100 * r['share']:5.1f}% x{r['calls'] / seen:6.1f}  {r['name']}")
    return True


if __name__ == "__main__":
    main()
