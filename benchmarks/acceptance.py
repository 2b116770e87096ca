"""Mean accepted draft length of each selection policy, on held-out code, through the real engine.

Grid: policy x budget ratio x draft length x temperature x context length. Every cell decodes the
same prompts (windows of this project's own sources, see ``benchmarks/prompts.py``) in one batched
``generate`` call and reports ``spec_stats['mean_accepted']`` (accepted drafts per verification,
out of ``draft_len``). With ``--diagnostics`` (the default on the CPU, where it costs little) it also
reports the attention mass the drafts' visible sets capture, per layer and averaged.

CPU, small (1k and 2k contexts, about 10 minutes on 2 cores; min_budget scaled down so the ratio,
not the 128-token floor, sets the budget):

    PYTHONPATH=. python benchmarks/acceptance.py --small --tag cpu_small

Accelerator, large (4k and 8k contexts; each command fits in about 4 minutes):

    PYTHONPATH=. python benchmarks/acceptance.py --device cuda --out $OUT --tag h200_k8
    PYTHONPATH=. python benchmarks/acceptance.py --device cuda --out $OUT --tag h200_k4_12 --draft-lens 4 12 --budgets 0.05

Rows are written to ``<out>/acceptance_<tag>.json`` after every cell (a run cut short keeps what it
measured), and a table to ``<out>/acceptance_<tag>.md`` at the end. ``--time-limit`` stops
starting new cells once that many seconds have passed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import multiprocessing
import json
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import hf_sparsespec  # noqa: E402
from benchmarks.prompts import held_out_prompts, prompts_digest  # noqa: E402

BENCH_MODEL = ROOT / "hf_sparsespec" / "models" / "bench-code-lm"
POLICIES = ("paper", "window", "pillar")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--small", action="store_true", help="CPU-sized run: 1k/2k contexts, few prompts and tokens")
    ap.add_argument("--contexts", type=int, nargs="+")
    ap.add_argument("--prompts", type=int, help="prompts per context, decoded together in one batch")
    ap.add_argument("--new-tokens", type=int)
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.02, 0.05, 0.10])
    ap.add_argument("--draft-lens", type=int, nargs="+", default=None)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.6, 0.0])
    ap.add_argument(
        "--min-budget", type=int, default=16,
        help="floor of the selection size. The library default (128) is 6-12%% of a 1-2k context and "
        "would hide the budget ratio; 16 lets the ratio decide at every context measured here",
    )
    ap.add_argument("--diagnostics", action=argparse.BooleanOptionalAction, default=None,
                    help="record selection mass (forces the reference attention; default: on for CPU)")
    ap.add_argument("--cuda-graphs", action="store_true", help="let the engine capture CUDA graphs (recaptured per cell)")
    ap.add_argument("--no-triton", action="store_true", help="CUDA: use the reference attention instead of the kernels")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds; no new cell starts after this")
    ap.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default 1 on the CPU: on a shared 2-core machine two threads ran 30x slower)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=None, help="CPU: cells run in this many processes, one thread each")
    ap.add_argument("--full-grid-max-context", type=int, default=None,
                    help="longer contexts run only the first of --draft-lens (keeps small runs short)")
    args = ap.parse_args(argv)
    on_cpu = args.device == "cpu"
    if args.small:
        # The whole grid at 1k, the k=8 part at 2k: about 10 minutes with two single-threaded jobs.
        defaults = dict(contexts=[1024, 2048], prompts=4, new_tokens=64, draft_lens=[8, 4, 12], time_limit=None, jobs=2,
                        full_grid_max_context=1024)
    elif on_cpu:
        defaults = dict(contexts=[2048], prompts=4, new_tokens=128, draft_lens=[8, 4, 12], time_limit=None, jobs=1)
    else:
        # One H200 run of about 4 minutes: the draft-length sweep is a second command (see above).
        defaults = dict(contexts=[4096, 8192], prompts=4, new_tokens=192, draft_lens=[8], time_limit=220.0, jobs=1)
    defaults.setdefault("full_grid_max_context", None)
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.diagnostics is None:
        args.diagnostics = on_cpu
    if args.threads is None and on_cpu:
        args.threads = 1
    if args.tag is None:
        args.tag = ("cpu_small" if args.small else "cpu") if on_cpu else "device"
    return args


def cells(args):
    """Cells in the order that matters most if a run is cut short: the headline setting first."""
    order = []
    for context in args.contexts:
        lens = args.draft_lens
        if args.full_grid_max_context is not None and context > args.full_grid_max_context:
            lens = lens[:1]
        for temperature, k, ratio in itertools.product(args.temperatures, lens, args.budgets):
            for policy in args.policies:
                order.append(dict(context=context, temperature=temperature, draft_len=k, budget_ratio=ratio, policy=policy))
    return order


def run_cell(model, prompts: list[torch.Tensor], cell: dict, args) -> dict:
    device = next(model.parameters()).device
    ids = torch.stack(prompts).to(device)
    sampled = cell["temperature"] > 0
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        custom_generate=hf_sparsespec.generate,
        return_dict_in_generate=True,
        max_new_tokens=args.new_tokens,
        # Code prompts rarely end a file, but an early EOS would shrink a cell's sample.
        min_new_tokens=args.new_tokens,
        do_sample=sampled,
        temperature=cell["temperature"] if sampled else None,
        top_k=0 if sampled else None,  # plain temperature sampling, as the paper measures
        top_p=None,
        selection=cell["policy"],
        budget_ratio=cell["budget_ratio"],
        min_budget=args.min_budget,
        draft_len=cell["draft_len"],
        diagnostics=args.diagnostics,
        use_cuda_graphs=None if args.cuda_graphs else False,
        use_triton=False if args.no_triton else None,
        # The unified scheduler staggers each request's first round (lengths k, k-1, ..., 0), which
        # would mix short rounds into "accepted of k"; acceptance per round does not depend on it.
        unified_schedule=False,
    )
    seconds = time.perf_counter() - started
    stats = out.spec_stats
    row = dict(
        cell,
        min_budget=args.min_budget,
        mean_accepted=stats["mean_accepted"],
        acceptance_rate=stats["acceptance_rate"],
        verifications=stats["num_verify_steps"],
        prompts=len(prompts),
        new_tokens=args.new_tokens,
        seconds=round(seconds, 2),
    )
    if "selection_mass_per_layer" in stats:
        per_layer = stats["selection_mass_per_layer"]
        row["selection_mass"] = sum(per_layer) / len(per_layer) if per_layer else None
        row["selection_mass_per_layer"] = per_layer
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Acceptance: {meta['tag']}",
        "",
        f"bench-code-lm, {meta['device']}, {meta['prompts']} held-out code prompts per context "
        f"(digests {meta['digests']}), {meta['new_tokens']} new tokens each, min_budget {meta['min_budget']}. "
        "Mean accepted drafts per verification (out of draft_len); in brackets the mean attention mass "
        "the draft's visible set captures, where measured. `gain` = pillar / max(paper, window).",
        "",
    ]
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    header = "| context | T | k | budget | " + " | ".join(policies) + " | gain |"
    lines += [header, "|" + " --- |" * (header.count("|") - 1)]
    keys = list(dict.fromkeys((r["context"], r["temperature"], r["draft_len"], r["budget_ratio"]) for r in rows))
    for key in keys:
        by_policy = {r["policy"]: r for r in rows if (r["context"], r["temperature"], r["draft_len"], r["budget_ratio"]) == key}
        cols = []
        for p in policies:
            r = by_policy.get(p)
            if r is None:
                cols.append("-")
                continue
            mass = f" ({r['selection_mass']:.2f})" if r.get("selection_mass") is not None else ""
            cols.append(f"{r['mean_accepted']:.2f}{mass}")
        base = [by_policy[p]["mean_accepted"] for p in ("paper", "window") if p in by_policy]
        gain = f"{by_policy['pillar']['mean_accepted'] / max(base):.2f}x" if "pillar" in by_policy and base and max(base) > 0 else "-"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]:.0%} | " + " | ".join(cols) + f" | {gain} |")
    return "\n".join(lines) + "\n"


_worker: dict = {}


def _load(args) -> None:
    """Per process: the model and the prompts (workers of ``--jobs`` load their own)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(BENCH_MODEL)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    _worker["model"] = AutoModelForCausalLM.from_pretrained(BENCH_MODEL, dtype=dtype).to(args.device).eval()
    _worker["prompts"] = {c: held_out_prompts(tok, c, args.prompts) for c in args.contexts}
    _worker["args"] = args


def _run(cell: dict) -> dict:
    return run_cell(_worker["model"], _worker["prompts"][cell["context"]], cell, _worker["args"])


def main(argv=None) -> None:
    args = parse_args(argv)
    _load(args)
    prompts = _worker["prompts"]
    dtype = next(_worker["model"].parameters()).dtype
    meta = dict(
        tag=args.tag, device=torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.processor() or 'cpu'})",
        prompts=args.prompts, new_tokens=args.new_tokens, min_budget=args.min_budget, dtype=str(dtype),
        digests={c: prompts_digest(p) for c, p in prompts.items()}, torch=torch.__version__,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"acceptance_{args.tag}.json"
    rows: list[dict] = []
    started = time.perf_counter()
    todo = cells(args)

    def record(row: dict) -> None:
        rows.append(row)
        mass = f" mass {row['selection_mass']:.3f}" if row.get("selection_mass") is not None else ""
        cell = {key: row[key] for key in ("context", "temperature", "draft_len", "budget_ratio", "policy")}
        print(f"[{time.perf_counter() - started:6.0f}s] {cell}: accepted {row['mean_accepted']:.2f}{mass} ({row['seconds']:.0f}s)", flush=True)
        json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    def out_of_time() -> bool:
        return args.time_limit is not None and time.perf_counter() - started > args.time_limit

    if args.jobs > 1:
        # CPU only: one single-threaded engine per core beats one engine on all cores (tiny ops).
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_load, initargs=(args,)) as pool:
            futures = [pool.submit(_run, cell) for cell in todo]
            for future in concurrent.futures.as_completed(futures):
                if future.cancelled():
                    continue
                record(future.result())
                if out_of_time():
                    for f in futures:
                        f.cancel()
    else:
        for cell in todo:
            if out_of_time():
                break
            record(_run(cell))
    done = {tuple(sorted((k, r[k]) for k in todo[0])) for r in rows}
    skipped = [c for c in todo if tuple(sorted(c.items())) not in done]
    if skipped:
        print(f"time limit reached: {len(skipped)} of {len(todo)} cells not run", flush=True)
        meta["skipped_cells"] = skipped
    order = {tuple(sorted(c.items())): i for i, c in enumerate(todo)}
    rows.sort(key=lambda r: order[tuple(sorted((k, r[k]) for k in todo[0]))])
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / f"acceptance_{args.tag}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
