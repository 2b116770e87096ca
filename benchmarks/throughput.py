"""Side-by-side decode throughput on one GPU: transformers baselines vs our engine's modes.

Run on the accelerator machine (one call, everything side by side):

    PYTHONPATH=. python3 benchmarks/throughput.py --out $OUT

Rows go to ``<out>/throughput.json`` (and .md, .png). Throughput is decode-only, so prefill cost
(large at 16k contexts) does not blur the step rates. Our engine's decode time is measured on the
device, from the end of its last prompt step to the end of its last step (CUDA events). The
transformers baselines run once with ``new_tokens`` and once with a single new token, and the
difference is divided into the tokens of the first run; at 16k contexts that difference of two
large times is noisy (our nospec moved from 19.4k to 24.1k tokens/s between two runs when it was
measured that way too). End-of-sequence is disabled so every row generates exactly ``new_tokens``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import hf_sparsespec
from hf_sparsespec.generation import engine as engine_module
from hf_sparsespec.generation import fused_rotary, strategy
from hf_sparsespec.generation import runner as runner_module

ROOT = Path(__file__).resolve().parents[1]
BENCH_MODEL = ROOT / "hf_sparsespec" / "models" / "bench-code-lm"
HBM_BYTES_PER_S = 4.3e12  # measured device-to-device copy rate of the H200 (DESIGN.md section 6)

ENGINE_METHODS = {
    "nospec": dict(speculate=False),
    "window": dict(selection="window"),
    "sparsespec": dict(),
    # Scheduler variants of sparsespec, measured to choose the defaults (not in the default run).
    "sparsespec_lockstep": dict(unified_schedule=False),
    "sparsespec_2groups": dict(verify_groups=2),
    "sparsespec_3groups": dict(verify_groups=3),
    "sparsespec_adaptive": dict(adaptive_draft=True),
    "sparsespec_adaptive_2groups": dict(adaptive_draft=True, verify_groups=2),
    # Selection over 16-token block masses that the attention kernel sums (no second read of K).
    "sparsespec_block": dict(selection="pillar_block"),
    "sparsespec_block_lockstep": dict(selection="pillar_block", unified_schedule=False),
    # Speculation to the end of the batch (the default decodes its thin tail plainly).
    "sparsespec_block_no_tail": dict(selection="pillar_block", plain_tail=0.0),
    "sparsespec_no_tail": dict(plain_tail=0.0),
    # The same without the fused projections and gated-MLP kernel (fused_linear), for an A/B in one call.
    "sparsespec_unfused_linear": dict(),
    "nospec_unfused_linear": dict(speculate=False),
    # The score pass's query tile sized as before session 10 (room for 16 queries, not draft_len + 1).
    "sparsespec_score_tile_16q": dict(),
    # Without the q/k norms folded into the rotary kernel and the residual adds into the norms (as before
    # session 12: fused_rotary's head norms, fused_residual), for an A/B in one call.
    "sparsespec_unfolded_norms": dict(),
    "nospec_unfolded_norms": dict(speculate=False),
    # Each round's first draft only after the verification's result is read (before session 13: a
    # request sat out the iteration its result travelled in), for an A/B in one call.
    "sparsespec_late_drafts": dict(),
    "sparsespec_lockstep_late_drafts": dict(unified_schedule=False),
}


class StepTimer:
    """Times every engine iteration with CUDA events, keyed by what its rows were, and the host's own
    work per decode iteration (planning, building and launching a step, reading results back; not
    the time it waits for the device, nor prompt iterations, whose eager forwards are host work of
    another kind), so a run shows whether the host or the device sets the pace."""

    def __init__(self) -> None:
        # (kind, start, end, kv positions read, has prompt rows, rows, host seconds of its launch)
        self.records: list[tuple[str, torch.cuda.Event, torch.cuda.Event, int, bool, int, float]] = []
        self.absorb_s: list[tuple[bool, float]] = []  # (the iteration read had prompt rows, host seconds)
        self._originals = (engine_module.Engine._launch, engine_module.Engine._absorb)

    def __enter__(self) -> "StepTimer":
        timer = self
        original_launch, original_absorb = self._originals

        def timed_launch(engine, rows):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            began = time.perf_counter()
            start.record()
            out = original_launch(engine, rows)
            end.record()
            host = time.perf_counter() - began
            kinds = {row.kind.value for row in rows}
            prompt = "prefill" in kinds
            out.has_prompt = prompt
            kind = kinds.pop() if len(kinds) == 1 else "mixed"
            kv_read = sum(_kv_read(engine, row) for row in rows)
            timer.records.append((kind, start, end, kv_read, prompt, len(rows), host))
            return out

        def timed_absorb(engine, results):
            if results.event is not None:
                results.event.synchronize()  # waiting for the device is not host work
            began = time.perf_counter()
            original_absorb(engine, results)
            timer.absorb_s.append((results.has_prompt, time.perf_counter() - began))

        engine_module.Engine._launch = timed_launch
        engine_module.Engine._absorb = timed_absorb
        return self

    def __exit__(self, *exc) -> None:
        engine_module.Engine._launch, engine_module.Engine._absorb = self._originals

    def summary(self, bytes_per_token: int, weight_bytes: int) -> dict:
        torch.cuda.synchronize()
        decode = [r for r in self.records if not r[4]]
        host_s = sum(r[6] for r in decode) + sum(s for prompt, s in self.absorb_s if not prompt)
        out = {"host_ms_per_decode_iteration": 1e3 * host_s / max(len(decode), 1), "decode_iterations": len(decode)}
        last_prompt = max((i for i, record in enumerate(self.records) if record[4]), default=None)
        if last_prompt is not None and last_prompt + 1 < len(self.records):
            out["decode_s"] = self.records[last_prompt][2].elapsed_time(self.records[-1][2]) / 1e3
        for kind in ("draft", "verify", "mixed"):
            times = [(s.elapsed_time(e), kv, n) for k, s, e, kv, _, n, _ in self.records if k == kind]
            if not times:
                continue
            ms = sorted(t for t, _, _ in times)[len(times) // 2]
            floors = [(weight_bytes + kv * bytes_per_token) / HBM_BYTES_PER_S * 1e3 for _, kv, _ in times]
            # Steps differ in rows (requests drift apart and finish), so each is set against its own floor.
            ratios = sorted(t / f for (t, _, _), f in zip(times, floors))
            widest = max(n for _, _, n in times)
            full = sorted((t, f) for (t, _, n), f in zip(times, floors) if n == widest)
            out[kind] = {"median_ms": ms, "floor_ms": sorted(floors)[len(floors) // 2], "steps": len(times),
                         "total_ms": sum(t for t, _, _ in times), "median_floor_ratio": ratios[len(ratios) // 2],
                         "widest_rows": widest, "widest_steps": len(full), "widest_median_ms": full[len(full) // 2][0],
                         "widest_floor_ms": full[len(full) // 2][1]}
        return out


def _kv_read(engine, row) -> int:
    """KV positions a row reads: the whole context, or the selection plus the tail for a sparse draft."""
    req = row.request
    if row.kind.value == "draft" and req.has_selection:
        return min(engine.config.budget(req.tail_start), engine.sel_width) + (req.num_cached + req.drafted + 1 - req.tail_start)
    return req.kv_after(row.kind, row.num_tokens)


def prompts_for(tokenizer, batch: int, prompt_len: int, seed: int) -> torch.Tensor:
    """Code prompts cut from this project's own sources (held out from the bench model's training)."""
    text = "\n\n".join(p.read_text() for p in sorted((ROOT / "hf_sparsespec").rglob("*.py")))
    text += "\n\n".join(p.read_text() for p in sorted((ROOT / "tests").rglob("*.py")))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    while ids.numel() < prompt_len + batch:
        ids = torch.cat([ids, ids])
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - prompt_len, (batch,), generator=g)
    return torch.stack([ids[s : s + prompt_len] for s in starts.tolist()])


def timed_generate(model, ids: torch.Tensor, new_tokens: int, method: str, sampling: dict, extra: dict | None = None) -> tuple[float, dict | None]:
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  eos_token_id=None, pad_token_id=0, **sampling)
    if method == "hf_static":
        kwargs["cache_implementation"] = "static"
    elif method in ENGINE_METHODS:
        kwargs.update(custom_generate=hf_sparsespec.generate, return_dict_in_generate=True, prefill_chunk=65536,
                      **{**ENGINE_METHODS[method], **(extra or {})})
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(**kwargs)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    stats = getattr(out, "spec_stats", None)
    sequences = out.sequences if hasattr(out, "sequences") else out
    assert sequences.shape[1] == ids.shape[1] + new_tokens, "EOS must be disabled for throughput runs"
    return seconds, stats


def measure(model, tag: str, ids: torch.Tensor, method: str, new_tokens: int, sampling: dict, bytes_per_token: int,
            weight_bytes: int, note: str = "", extra: dict | None = None) -> dict:
    batch, prompt_len = ids.shape
    # Warm-up: compilation (hf_static), Triton compiles and graph capture (our engine) stay out of
    # the timings. The warm-up is the timed call itself: the engine captures one graph per
    # (token, verification-row) bucket pair it meets, so a shorter warm-up misses pairs (a 48-token
    # one did, and the first H200 table paid for captures inside its timings), and a call with a
    # longer context than the engine was built for rebuilds it (new pool, new graphs).
    engine = method in ENGINE_METHODS
    if method == "hf_static":
        timed_generate(model, ids, 48, method, sampling, extra)
    elif engine:
        timed_generate(model, ids, new_tokens, method, sampling, extra)
    base = None if engine else timed_generate(model, ids, 1, method, sampling, extra)[0]
    with StepTimer() as timer:
        total, stats = timed_generate(model, ids, new_tokens, method, sampling, extra)
    steps = timer.summary(bytes_per_token, weight_bytes) if engine else {}
    decode_s = max(steps.get("decode_s", 0.0) if engine else total - base, 1e-9)
    tokens = batch * (new_tokens - 1)
    # Plain decoding reads all weights and the whole KV once per token: that floor per token.
    mean_ctx = prompt_len + new_tokens / 2
    floor_s = (new_tokens - 1) * (weight_bytes + batch * mean_ctx * bytes_per_token) / HBM_BYTES_PER_S
    row = {
        "model": tag,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "method": method,
        "tokens_per_s": tokens / decode_s,
        "mean_accepted": stats["mean_accepted"] if stats and method != "nospec" else None,
        "mean_draft_len": stats["mean_draft_len"] if stats and method != "nospec" else None,
        "ms_per_draft_step": steps.get("draft", {}).get("median_ms"),
        "ms_per_verify_step": steps.get("verify", {}).get("median_ms"),
        "ms_per_mixed_step": steps.get("mixed", {}).get("median_ms"),
        "draft_floor_ms": steps.get("draft", {}).get("floor_ms"),
        "verify_floor_ms": steps.get("verify", {}).get("floor_ms"),
        # >1 means faster than plain decoding could ever be at this memory bandwidth.
        "floor_ratio": floor_s / decode_s,
        "steps": {kind: steps[kind] for kind in ("draft", "verify", "mixed") if kind in steps},
        "host_ms_per_decode_iteration": steps.get("host_ms_per_decode_iteration"),
        "decode_iterations": steps.get("decode_iterations"),
        # The batch ends with its slowest request: the spread of per-request acceptance explains tails.
        "accepted_per_request": _spread(stats["mean_accepted_per_sequence"]) if stats and method != "nospec" else None,
        "note": note,
    }
    print(json.dumps(row), flush=True)
    return row


def _spread(values: list[float]) -> dict:
    ordered, n = sorted(values), len(values)
    quantiles = {"min": 0.0, "p10": 0.1, "median": 0.5, "p90": 0.9}
    return {name: ordered[min(n - 1, int(q * n))] for name, q in quantiles.items()} | {"max": ordered[-1]}


def random_qwen3_8b(device: str) -> torch.nn.Module:
    config = AutoConfig.for_model(
        "qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1e6, tie_word_embeddings=False, use_sliding_window=False,
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.eval()


def kv_bytes_per_token(model) -> int:
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * getattr(c, "head_dim", c.hidden_size // c.num_attention_heads) * 2


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run_bench(args, rows: list) -> None:
    """Each (shape, method) runs in its own process: a device-side assert ends the CUDA context,
    and in-process it would lose every row after it."""
    for batch, context in args.shapes:
        for method in args.methods:
            if method == "hf_static" and (batch, context) not in args.static_shapes:
                continue  # each static shape compiles for minutes; measured at the headline shapes only
            child = [sys.executable, __file__, "--child", f"{batch}x{context}", method, "--new-tokens", str(args.new_tokens)]
            proc = subprocess.run(child, capture_output=True, text=True)
            found = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
            if found:
                rows.append(json.loads(found[-1][len("ROW "):]))
                print(found[-1][len("ROW "):], flush=True)
            else:
                errors = [ln for ln in proc.stderr.splitlines() if "rror" in ln or "ssert" in ln]
                print(f"FAILED {method} batch={batch} context={context}: {' | '.join(dict.fromkeys(errors))[:600]}", flush=True)
            write_tables(rows, args.out)  # after every row: a run cut short keeps what it measured


class _Unfused:
    """Stands in for ``FusedLinears`` or ``FusedResiduals``: the model's modules keep their own code."""

    def __init__(self, *model_and_norms) -> None:
        pass

    def swapped(self):
        return contextlib.nullcontext()


def _score_tile_16q(tile_shape):
    """``_tile_shape`` as it was before session 10: the verification length ignored."""
    return lambda *args, **kwargs: tile_shape(*args, **{**kwargs, "verify_len": 0})


@contextlib.contextmanager
def _variant(method: str):
    """The engine as ``method`` names it, for the duration of the block."""
    saved = runner_module.FusedLinears, runner_module.FusedResiduals, fused_rotary._head_norm_forwards
    early_drafts = engine_module.Engine.EARLY_DRAFTS
    engine_module.Engine.EARLY_DRAFTS = not method.endswith("_late_drafts")
    if method.endswith("_unfused_linear"):
        runner_module.FusedLinears = _Unfused
    if method.endswith("_unfolded_norms"):
        runner_module.FusedResiduals = _Unfused
        fused_rotary._head_norm_forwards = set
    try:
        yield
    finally:
        runner_module.FusedLinears, runner_module.FusedResiduals, fused_rotary._head_norm_forwards = saved
        engine_module.Engine.EARLY_DRAFTS = early_drafts


def run_one(shape: str, method: str, new: int) -> dict:
    with _variant(method):
        return _run_one(shape, method, new)


def _run_one(shape: str, method: str, new: int) -> dict:
    if method.endswith("_score_tile_16q"):
        from hf_sparsespec.attention import triton_kernels

        triton_kernels._tile_shape = _score_tile_16q(triton_kernels._tile_shape)
    batch, context = (int(v) for v in shape.split("x"))
    model = AutoModelForCausalLM.from_pretrained(BENCH_MODEL, dtype=torch.bfloat16).cuda().eval()
    tok = AutoTokenizer.from_pretrained(BENCH_MODEL)
    ids = prompts_for(tok, batch, context - new, seed=batch).cuda()
    n, note = new, ""
    if method == "hf_eager" and batch * context > 64 * 1024:
        n, note = min(new, 64), "fewer new tokens (time limit), same context"
    return measure(model, "bench-code-lm", ids, method, n, dict(do_sample=True, temperature=0.6),
                   kv_bytes_per_token(model), weight_bytes(model), note)


def run_qwen8b(args, rows: list) -> None:
    model = random_qwen3_8b("cuda")
    bpt, wb = kv_bytes_per_token(model), weight_bytes(model)
    ids = torch.randint(1000, 100000, (args.qwen_batch, args.qwen_context - args.qwen_new_tokens), device="cuda")
    # The whole batch's KV (64 x 8k x 147 KB = 77 GB) must fit, or offloading would thin the steps.
    # Lockstep needs synchronous verification too: with delayed verification the last prompt chunk's
    # requests start a step late and steps split into 56 + 8 rows (seen on the CPU); in session 3
    # the median pure verification step read ~24k positions, the KV of about 3 of the 64 requests.
    note = "random weights: acceptance meaningless; system timings only; lockstep rounds so steps are pure draft or verify"
    for method in args.qwen_methods:
        # Each method builds its own engine (variants of one configuration would share a cached one).
        strategy._ENGINES.pop(model, None)
        gc.collect()
        torch.cuda.empty_cache()
        try:
            with _variant(method):
                rows.append(measure(model, "qwen3-8b-shape-random", ids, method, args.qwen_new_tokens,
                                    dict(do_sample=False), bpt, wb, note,
                                    extra=dict(unified_schedule=False, delayed_verification=False,
                                               kv_memory_fraction=0.9)))
        except Exception as exc:
            print(f"FAILED qwen8b {method}: {exc!r}", flush=True)
        write_tables(rows, args.out)


def write_tables(rows: list, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = "throughput" if any(r["model"] == "bench-code-lm" for r in rows) else "throughput_qwen8b"
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    cols = ["model", "batch", "prompt_len", "new_tokens", "method", "tokens_per_s", "mean_accepted", "mean_draft_len",
            "ms_per_draft_step", "ms_per_verify_step", "ms_per_mixed_step", "floor_ratio", "note"]

    def fmt(v):
        if v is None:
            return "-"
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        bench = [r for r in rows if r["model"] == "bench-code-lm"]
        # Panels by prompt length: a baseline run on fewer new tokens (same context) shares its shape's panel.
        contexts = sorted({r["prompt_len"] for r in bench})
        fig, axes = plt.subplots(1, max(len(contexts), 1), figsize=(6 * max(len(contexts), 1), 4), squeeze=False)
        for ax, ctx in zip(axes[0], contexts):
            for method in dict.fromkeys(r["method"] for r in bench):
                pts = sorted((r["batch"], r["tokens_per_s"]) for r in bench
                             if r["method"] == method and r["prompt_len"] == ctx)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size")
            ax.set_ylabel("decode tokens/s")
            ax.set_title(f"bench-code-lm on H200, {ctx}-token prompts")
            ax.legend()
        fig.tight_layout()
        if bench:
            fig.savefig(out / "throughput.png", dpi=120)
        plt.close(fig)
    except ImportError:
        print("matplotlib missing: no plot")


def _shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--shapes", type=_shapes, default=_shapes("1x2048,16x2048,64x2048,128x2048,16x16384,128x16384"),
                   help="batch x context pairs for bench-code-lm")
    p.add_argument("--static-shapes", type=_shapes, default=_shapes("1x2048,128x16384"),
                   help="shapes at which hf_static (compiled, minutes per shape) is measured")
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--methods", type=lambda s: s.split(","), default=["hf_eager", "hf_static", "nospec", "window", "sparsespec"])
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--qwen8b", action="store_true", help="also time the Qwen3-8B-shaped random model")
    p.add_argument("--qwen-batch", type=int, default=64)
    p.add_argument("--qwen-context", type=int, default=8192)
    p.add_argument("--qwen-new-tokens", type=int, default=64)
    p.add_argument("--qwen-methods", type=lambda s: s.split(","), default=["nospec", "sparsespec"])
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                   help="run nothing: write one table and plot of the rows of these throughput.json files (of calls that each ran some shapes)")
    p.add_argument("--child", nargs=2, metavar=("SHAPE", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("ROW " + json.dumps(run_one(*args.child, args.new_tokens)), flush=True)
        return
    if args.merge:
        write_tables([row for path in args.merge for row in json.loads(path.read_text())], args.out)
        print((args.out / "throughput.md").read_text())
        return
    rows: list = []
    try:
        if not args.skip_bench:
            run_bench(args, rows)
        if args.qwen8b:
            run_qwen8b(args, rows)
    finally:
        write_tables(rows, args.out)
    for name in ("throughput.md", "throughput_qwen8b.md"):
        if (args.out / name).exists():
            print((args.out / name).read_text())
    # What the table leaves out: how acceptance spreads over a run's requests (the slowest decides when
    # a batch ends) and the steps of each kind with their total time.
    for r in rows:
        steps = {kind: (v["steps"], round(v["total_ms"])) for kind, v in r.get("steps", {}).items()}
        print(f"{r['model']} {r['batch']}x{r['prompt_len']} {r['method']}: accepted per request "
              f"{r.get('accepted_per_request')}, steps and ms {steps}, host {r.get('host_ms_per_decode_iteration')} ms per "
              f"decode iteration, {r.get('decode_iterations')} decode iterations")


if __name__ == "__main__":
    main()
