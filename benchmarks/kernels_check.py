"""GPU check of the Triton kernels: correctness against the PyTorch reference at real sizes, CUDA-graph
capture, and achieved memory bandwidth.

    PYTHONPATH=. python3 benchmarks/kernels_check.py --out $OUT

Writes ``kernels_check.json`` into ``--out`` after every section (so a timeout keeps what finished)
and prints a table last. Each case is timed eagerly (do_bench: Python launch costs included when
they exceed the GPU time) and replayed from a CUDA graph, as the engine runs decode steps; the
bandwidth column uses the graph time. Bandwidth counts the bytes the attention must read, over 4.3
TB/s (the H200's measured copy bandwidth, DESIGN.md section 6): K and V of the whole context for full
rows, of the selected positions plus the tail for draft rows, plus the queries and outputs. The
score pass re-reads K of verification rows; that is not counted, so cases with scores show its cost
as lost bandwidth. Contexts up to 16k, batches up to 128 rows, random data (timings do not depend on it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch
import triton
import triton.testing

from hf_sparsespec.attention import selection, triton_kernels
from hf_sparsespec.attention.context import StepContext
from hf_sparsespec.attention.reference import reference_attention
from hf_sparsespec.cache.paged_cache import write_kv_reference

PEAK_BYTES_PER_S = 4.3e12
TIME_BUDGET_S = 140  # the whole script must finish within 3 minutes (compiles included); optional parts stop here
SHAPES = {"qwen3-8b": (32, 8, 128), "bench": (6, 2, 64)}  # q heads, kv heads, head dim
DEVICE = torch.device("cuda")
START = time.monotonic()


@dataclass
class Row:
    kind: str  # "full", "draft" or "pad"
    n: int = 0
    kv: int = 0
    tail: int = 0
    count: int = 0
    scores: bool = False


@dataclass
class Batch:
    query: torch.Tensor  # (1, Hq, T, D)
    k_pool: torch.Tensor
    v_pool: torch.Tensor
    ctx: StepContext
    rows: list[Row]
    real: torch.Tensor  # [T] bool: tokens of some row

    def kv_bytes(self) -> int:
        """K+V bytes the attention must read, plus the queries and outputs."""
        _, hkv, d = self.k_pool.shape
        per_token = 2 * hkv * d * self.k_pool.element_size()
        tokens = sum(r.kv if r.kind == "full" else r.count + r.kv - r.tail for r in self.rows if r.kind != "pad")
        return tokens * per_token + 2 * self.query.numel() * self.query.element_size()


def decode_rows(kinds: list[str], contexts: list[int], k: int = 8) -> list[Row]:
    """Draft and verification rows as SparseSpec builds them: budget max(128, 5%) capped at 6144."""
    rows = []
    for kind, kv in zip(kinds, contexts):
        if kind == "draft":
            tail = kv - 1 - (kv % k)  # the tokens since the last verification, this one included
            rows.append(Row("draft", 1, kv, tail, min(tail, min(6144, max(128, math.ceil(0.05 * kv))))))
        elif kind == "verify":
            rows.append(Row("full", k + 1, kv, scores=True))
        else:
            rows.append(Row("full", 1, kv))
    return rows


def build(shape: str, dtype: torch.dtype, page_size: int, rows: list[Row], *, tokens: int | None = None,
          graph_like: bool = False, max_kv_len: int | None = None, seed: int = 0, num_pages: int | None = None,
          table_width: int | None = None, sel_width: int | None = None, num_score_rows: int | None = None) -> Batch:
    """A packed batch over a randomly paged pool. Spare pages hold NaN, so stray reads show.

    ``graph_like`` pads rows up to one per token, as a captured decode graph sees its batch; the
    last four arguments fix tensor shapes so that several batches fit one set of buffers.
    """
    hq, hkv, d = SHAPES[shape]
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    num_tokens = tokens or sum(r.n for r in rows)
    if graph_like:
        rows = rows + [Row("pad")] * (num_tokens - len(rows))
    pages_of = [triton.cdiv(r.kv, page_size) for r in rows]
    num_pages = num_pages or sum(pages_of) + max(8, sum(pages_of) // 20)
    spare = num_pages - sum(pages_of)
    assert spare > 0
    k_pool = torch.randn(num_pages * page_size, hkv, d, generator=gen, device=DEVICE, dtype=dtype)
    v_pool = torch.randn(num_pages * page_size, hkv, d, generator=gen, device=DEVICE, dtype=dtype)
    perm = torch.randperm(num_pages, generator=gen, device=DEVICE)
    spare_slots = (perm[-spare:, None] * page_size + torch.arange(page_size, device=DEVICE)).flatten()
    k_pool[spare_slots] = float("nan")
    v_pool[spare_slots] = float("nan")
    width = table_width or max(pages_of) + 1
    block_tables = torch.full((len(rows), width), -1, dtype=torch.int64, device=DEVICE)
    sel_width = sel_width or max([r.count for r in rows] + [1])
    selection = torch.full((len(rows), 1, hkv, sel_width), -1, dtype=torch.int32, device=DEVICE)
    sel_count = torch.zeros(len(rows), dtype=torch.int32, device=DEVICE)
    meta = {name: [] for name in ("q_start", "q_len", "kv_len", "is_draft", "tail_start", "score_row")}
    slot_mapping = torch.full((num_tokens,), -1, dtype=torch.int64, device=DEVICE)
    real = torch.zeros(num_tokens, dtype=torch.bool, device=DEVICE)
    first_page, token, num_scores = 0, 0, 0
    for i, (r, pages) in enumerate(zip(rows, pages_of)):
        table = perm[first_page : first_page + pages]
        first_page += pages
        block_tables[i, :pages] = table
        if r.n:
            positions = torch.arange(r.kv - r.n, r.kv, device=DEVICE)
            slot_mapping[token : token + r.n] = table[positions // page_size] * page_size + positions % page_size
            real[token : token + r.n] = True
        if r.kind == "draft" and r.count:
            sel_count[i] = r.count
            chosen = torch.rand(hkv, r.tail, generator=gen, device=DEVICE).topk(r.count, dim=1).indices
            selection[i, 0, :, : r.count] = chosen.sort(dim=1).values.to(torch.int32)
        meta["q_start"].append(token if r.n else 0)
        meta["q_len"].append(r.n)
        meta["kv_len"].append(r.kv)
        meta["is_draft"].append(r.kind == "draft")
        meta["tail_start"].append(r.tail)
        meta["score_row"].append(num_scores if r.scores else -1)
        num_scores += r.scores
        token += r.n
    assert token <= num_tokens
    max_kv = max_kv_len or max(r.kv for r in rows)
    # Queries twice as large as K make the softmax peaky, as trained models' often is.
    query = (2 * torch.randn(1, num_tokens, hq, d, generator=gen, device=DEVICE)).to(dtype).transpose(1, 2)
    as_long = lambda name: torch.tensor(meta[name], dtype=torch.int64, device=DEVICE)  # noqa: E731
    ctx = StepContext(
        cache=SimpleNamespace(page_size=page_size),
        slot_mapping=slot_mapping,
        q_start=as_long("q_start"),
        q_len=as_long("q_len"),
        kv_len=as_long("kv_len"),
        block_tables=block_tables,
        is_draft=torch.tensor(meta["is_draft"], dtype=torch.bool, device=DEVICE),
        tail_start=as_long("tail_start"),
        sel_slot=torch.arange(len(rows), dtype=torch.int64, device=DEVICE),
        selection=selection,
        sel_count=sel_count,
        score_row=as_long("score_row"),
        scores=torch.full((num_score_rows or num_scores, 1, hkv, max_kv), float("nan"), device=DEVICE) if num_scores else None,
        max_kv_len=max_kv,
        use_triton=True,
        verify_len=max([r.n for r in rows if r.scores] + [0]),  # as the engine sets it: draft_len + 1
    )
    return Batch(query, k_pool, v_pool, ctx, rows, real)


def compare(batch: Batch, got: torch.Tensor, got_scores: torch.Tensor | None) -> dict:
    """Errors against the reference on upcast inputs, over real tokens and scored positions."""
    scale = batch.query.shape[-1] ** -0.5
    ref_ctx = replace(batch.ctx, scores=None if batch.ctx.scores is None else torch.full_like(batch.ctx.scores, float("nan")))
    expected = reference_attention(batch.query.float(), batch.k_pool, batch.v_pool, ref_ctx, 0, scale)
    diff = (got[0, batch.real].float() - expected[0, batch.real]).abs()
    result = {"out_max_err": diff.max().item(), "out_finite": bool(torch.isfinite(got[0, batch.real]).all())}
    if got_scores is not None:
        written = ~torch.isnan(ref_ctx.scores)
        result["scores_same_cells"] = bool(torch.equal(written, ~torch.isnan(got_scores)))
        ref = ref_ctx.scores[written]
        result["scores_max_rel_err"] = ((got_scores[written] - ref).abs() / (ref.abs() + 1e-6)).max().item()
    return result


def passed(check: dict, dtype: torch.dtype) -> bool:
    tol = {torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    ok = check["out_finite"] and check["out_max_err"] <= tol
    if "scores_max_rel_err" in check:
        ok = ok and check["scores_same_cells"] and check["scores_max_rel_err"] <= 1e-2
    return ok


def run_attention(batch: Batch, **overrides) -> tuple[torch.Tensor, torch.Tensor | None]:
    scale = batch.query.shape[-1] ** -0.5
    out = triton_kernels.paged_attention(batch.query, batch.k_pool, batch.v_pool, batch.ctx, 0, scale, **overrides)
    return out, batch.ctx.scores


def mixed_rows(contexts: list[int], prefill: tuple[int, int] | None) -> list[Row]:
    """Every row kind: verification with and without scores, drafts with and without a selection,
    drafts before the first verification, a prefill chunk, padding rows."""
    kinds = ["draft", "verify", "draft", "full", "draft", "draft", "full", "draft"]
    rows = decode_rows([kinds[i % len(kinds)] for i in range(len(contexts))], contexts)
    rows[3 % len(rows)] = replace(rows[3 % len(rows)], n=9, scores=False)  # verification without scores
    empty = next(i for i, r in enumerate(rows) if r.kind == "draft")
    rows[empty] = replace(rows[empty], count=0)  # a draft with an empty selection: tail only
    if prefill:
        n, kv = prefill
        rows.insert(1, Row("full", n, kv))
    rows.insert(2, Row("pad"))
    return rows


def correctness(results: dict) -> None:
    gen = torch.Generator().manual_seed(1)
    ctx_sizes = lambda count, lo, hi: torch.randint(lo, hi, (count,), generator=gen).tolist()  # noqa: E731
    cases = [
        ("qwen3-8b", torch.bfloat16, 16, mixed_rows(ctx_sizes(24, 200, 16384), (256, 4096)), {}),
        ("qwen3-8b", torch.float16, 1, mixed_rows(ctx_sizes(24, 200, 16384), (128, 3000)), {}),
        ("qwen3-8b", torch.bfloat16, 64, mixed_rows(ctx_sizes(24, 200, 16384), None), dict(graph_like=True, tokens=128)),
        ("bench", torch.bfloat16, 64, mixed_rows(ctx_sizes(40, 50, 16384), (512, 700)), {}),
        ("bench", torch.float16, 16, mixed_rows(ctx_sizes(120, 50, 16384), None), dict(graph_like=True, tokens=256)),
        ("qwen3-8b", torch.bfloat16, 16, decode_rows(["verify"], [16384]), dict(graph_like=True, tokens=16)),
        ("qwen3-8b", torch.float16, 16, decode_rows(["draft"], [16000]), dict(graph_like=True, tokens=8)),
        ("qwen3-8b", torch.bfloat16, 1, decode_rows(["verify"] * 14 + ["draft"] * 114, ctx_sizes(128, 2000, 16384)),
         dict(graph_like=True, tokens=256)),
    ]
    for i, (shape, dtype, page, rows, opts) in enumerate(cases):
        name = f"{shape}/{str(dtype)[6:]}/page{page}/rows{sum(r.kind != 'pad' for r in rows)}" + ("/graph" if opts.get("graph_like") else "")
        try:
            batch = build(shape, dtype, page, rows, seed=i, **opts)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")  # any host sync inside the kernels raises
            try:
                out, scores = run_attention(batch)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            check = compare(batch, out, scores)
            check["passed"] = passed(check, dtype)
        except Exception:
            check = {"passed": False, "error": traceback.format_exc(limit=4)}
        results["correctness"][name] = check
        print(f"[check] {name}: {check}", flush=True)


def graph_capture(results: dict) -> None:
    """Capture write_kv + paged_attention on all-padding metadata, then replay on two different real
    batches copied into the same buffers: no metadata value may be baked into the graph."""
    shape, dtype, page, tokens, max_kv = "qwen3-8b", torch.bfloat16, 16, 128, 8192
    hkv, d = SHAPES[shape][1:]
    gen = torch.Generator().manual_seed(7)
    contexts = torch.randint(100, max_kv, (48,), generator=gen).tolist()
    first_rows = mixed_rows(contexts, None)
    # Other lengths, and some drafts turned into full rows (as before a first verification).
    second_rows = [replace(r, kv=r.kv // 2 + 7, tail=max(0, r.tail // 2), count=min(r.count, r.tail // 2)) for r in first_rows]
    second_rows = [Row("full", 1, r.kv) if r.kind == "draft" and i % 3 == 0 else r for i, r in enumerate(second_rows)]
    sizes = dict(tokens=tokens, graph_like=True, max_kv_len=max_kv, num_pages=sum(triton.cdiv(c, page) for c in contexts) + 64,
                 table_width=triton.cdiv(max_kv, page) + 1, sel_width=max(r.count for r in first_rows),
                 num_score_rows=sum(r.scores for r in first_rows))
    batches = {"first": build(shape, dtype, page, first_rows, seed=11, **sizes),
               "second": build(shape, dtype, page, second_rows, seed=12, **sizes)}
    static = build(shape, dtype, page, first_rows, seed=13, **sizes)
    new_k = torch.randn(1, tokens, hkv, d, device=DEVICE, dtype=dtype).transpose(1, 2)[0]
    new_v = torch.randn_like(new_k)
    fields = ("slot_mapping", "q_start", "q_len", "kv_len", "block_tables", "is_draft", "tail_start", "sel_slot",
              "selection", "sel_count", "score_row")
    blank = {"slot_mapping": -1, "score_row": -1, "block_tables": -1, "selection": -1}
    for f in fields:
        getattr(static.ctx, f).fill_(blank.get(f, 0))
    scale = d**-0.5

    def step():
        triton_kernels.write_kv(static.k_pool, static.v_pool, new_k, new_v, static.ctx.slot_mapping)
        return triton_kernels.paged_attention(static.query, static.k_pool, static.v_pool, static.ctx, 0, scale)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    report = {}
    for label, batch in batches.items():
        for f in fields:
            getattr(static.ctx, f).copy_(getattr(batch.ctx, f))
        static.query.copy_(batch.query)
        static.k_pool.copy_(batch.k_pool)
        static.v_pool.copy_(batch.v_pool)
        static.ctx.scores.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref_k, ref_v = batch.k_pool.clone(), batch.v_pool.clone()
        write_kv_reference(ref_k, ref_v, new_k, new_v, batch.ctx.slot_mapping)
        check = compare(replace(batch, k_pool=ref_k, v_pool=ref_v), out, static.ctx.scores)
        check["write_kv_equal"] = torch.equal(static.k_pool.nan_to_num(3.0), ref_k.nan_to_num(3.0)) and torch.equal(
            static.v_pool.nan_to_num(3.0), ref_v.nan_to_num(3.0))
        check["passed"] = passed(check, dtype) and check["write_kv_equal"]
        report[label] = check
        print(f"[graph] replay on the {label} batch: {check}", flush=True)
    results["graph_capture"] = report


def graph_ms(fn, reps: int = 30) -> float:
    """Median time of ``fn`` captured in a CUDA graph, as the engine replays decode steps: no Python
    launch cost. L2 is flushed before every replay, as do_bench does."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    flush = torch.empty(256 << 20, dtype=torch.int8, device=DEVICE)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return sorted(start.elapsed_time(end) for start, end in events)[reps // 2]


def timing(results: dict, label: str, batch: Batch, note: str = "", flops: float = 0.0, **overrides) -> None:
    out, _ = run_attention(batch, **overrides)  # compile outside the timed region
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(lambda: run_attention(batch, **overrides), warmup=10, rep=40, return_mode="median")
    graph = graph_ms(lambda: run_attention(batch, **overrides))
    nbytes = batch.kv_bytes()
    entry = {"ms": ms, "graph_ms": graph, "bytes": nbytes, "tb_per_s": nbytes / graph / 1e9,
             "pct_of_4.3": 100 * nbytes / graph / 1e9 / (PEAK_BYTES_PER_S / 1e12), "note": note, "overrides": overrides}
    if flops:
        entry["tflop_per_s"] = flops / graph / 1e9
        entry["note"] = f"{note}; {entry['tflop_per_s']:.0f} TFLOP/s"
    results["timing"][label] = entry
    print(f"[time] {label}: {ms * 1e3:.1f} us eager, {graph * 1e3:.1f} us graph, {entry['tb_per_s']:.2f} TB/s "
          f"({entry['pct_of_4.3']:.0f}%) {entry['note']}", flush=True)


def causal_flops(n: int, shape: str) -> float:
    """Q K^T and P V multiply-adds of a causal prefill of n tokens from position 0."""
    hq, _, d = SHAPES[shape]
    return 4.0 * hq * d * n * (n + 1) / 2


def timings(results: dict) -> None:
    gen = torch.Generator().manual_seed(3)
    q, bf = "qwen3-8b", torch.bfloat16
    unified = ["verify"] * 14 + ["draft"] * 114  # about 1 in k+1 rows verifies
    contexts = torch.randint(2000, 16384, (128,), generator=gen).tolist()
    cases = [  # built one at a time: the 128-row pools take gigabytes each
        ("draft b1 16k", lambda: build(q, bf, 16, decode_rows(["draft"], [16384]), graph_like=True, tokens=8), "graph bucket 8"),
        ("verify b1 16k +scores", lambda: build(q, bf, 16, decode_rows(["verify"], [16384]), graph_like=True, tokens=16), "k+1=9 queries"),
        ("full decode b32 8k", lambda: build(q, bf, 16, decode_rows(["full"] * 32, [8192] * 32), graph_like=True, tokens=32), "plain paged decode"),
        ("unified b128 2-16k p16", lambda: build(q, bf, 16, decode_rows(unified, contexts), graph_like=True, tokens=256), "14 verify+scores, 114 draft"),
        ("unified b128 2-16k p1", lambda: build(q, bf, 1, decode_rows(unified, contexts), graph_like=True, tokens=256), "token pages (paper)"),
        ("unified b128 2-16k p64", lambda: build(q, bf, 64, decode_rows(unified, contexts), graph_like=True, tokens=256), ""),
        ("unified b128 bench-shape", lambda: build("bench", bf, 16, decode_rows(unified, contexts), graph_like=True, tokens=256), "6/2/64"),
        ("prefill 2048 @0", lambda: build(q, bf, 16, [Row("full", 2048, 2048)]), "causal; bytes understate"),
    ]
    for label, make, note in cases:
        if time.monotonic() - START > TIME_BUDGET_S:
            results["skipped"].append(label)
            continue
        try:
            batch = make()
            timing(results, label, batch, note, flops=causal_flops(2048, q) if label.startswith("prefill") else 0.0)
            if label == "verify b1 16k +scores":
                timing(results, "verify b1 16k no scores", replace(batch, ctx=replace(batch.ctx, scores=None)), "score pass cost = difference")
        except Exception:
            results["timing"][label] = {"error": traceback.format_exc(limit=4)}
        batch = None
        save(results)
    # Tuning sweeps on the unified batch and batch-1 draft, while time remains.
    if time.monotonic() - START > TIME_BUDGET_S:
        results["skipped"].append("sweeps")
        return
    base = build(q, bf, 16, decode_rows(unified, contexts), graph_like=True, tokens=256)
    draft1 = build(q, bf, 16, decode_rows(["draft"], [16384]), graph_like=True, tokens=8)
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    sweeps = [
        ("sweep unified block_m=64", base, dict(block_m=64)),
        ("sweep unified one split", base, dict(split_tokens=1 << 20)),
        ("sweep unified 2 items/SM", base, dict(target_items=2 * sms)),
        ("sweep unified 8 items/SM", base, dict(target_items=8 * sms)),
        ("sweep unified block_n=32", base, dict(block_n=32)),
        ("sweep draft b1 one split", draft1, dict(split_tokens=1 << 20)),
        ("sweep draft b1 block_n=32", draft1, dict(block_n=32)),
    ]
    for label, batch, overrides in sweeps:
        if time.monotonic() - START > TIME_BUDGET_S:
            results["skipped"].append(label)
            continue
        try:
            timing(results, label, batch, "tuning", **overrides)
        except Exception:
            results["timing"][label] = {"error": traceback.format_exc(limit=4)}
        save(results)


def timed_variant(results: dict, name: str, batch: Batch, check, **overrides) -> None:
    """Time one tuning variant while the time budget lasts, noted by whether ``check(out, scores)``
    accepts its results."""
    if time.monotonic() - START > TIME_BUDGET_S:
        results["skipped"].append(name)
        return
    try:
        got, got_scores = run_attention(batch, **overrides)
        timing(results, name, batch, "matches" if check(got, got_scores) else "MISMATCH", **overrides)
    except Exception:
        results["timing"][name] = {"error": traceback.format_exc(limit=4)}
        print(f"[error] {name}: {results['timing'][name]['error'][-300:]}", flush=True)
    save(results)


def verify_sweep(results: dict) -> None:
    """Verification rows' cost (``--only verify-sweep``, after the correctness checks): with the
    per-position PillarAttn score pass (a second read of K), without scores, and with 16-position
    block scores summed during the attention pass (``selection="pillar_block"``), and for
    verification-only steps 64-row tiles. Block scores are checked against the block sums
    of the per-position ones, outputs against the default's. (The register-cap variants that set
    the defaults are in sessions 6 and 7's results, made by this function at 58f46ec and 5b7105b.)"""
    gen = torch.Generator().manual_seed(3)
    q, bf = "qwen3-8b", torch.bfloat16
    unified = ["verify"] * 14 + ["draft"] * 114
    contexts = torch.randint(2000, 16384, (128,), generator=gen).tolist()
    cases = [
        ("verify b32 8k", lambda: build(q, bf, 16, decode_rows(["verify"] * 32, [8192] * 32), graph_like=True, tokens=288)),
        ("verify b1 16k", lambda: build(q, bf, 16, decode_rows(["verify"], [16384]), graph_like=True, tokens=16)),
        ("unified b128 2-16k", lambda: build(q, bf, 16, decode_rows(unified, contexts), graph_like=True, tokens=256)),
        ("unified b128 bench-shape", lambda: build("bench", bf, 16, decode_rows(unified, contexts), graph_like=True, tokens=256)),
    ]
    for label, make in cases:
        batch = make()
        want, want_scores = (t.clone() for t in run_attention(batch))
        width = want_scores.shape[-1]
        unscored = replace(batch, ctx=replace(batch.ctx, scores=None))
        blocked = replace(batch, ctx=replace(batch.ctx, score_block=selection.SCORE_BLOCK))
        variants = [  # (name, batch, score block of the check or None, overrides)
            ("per-position scores", batch, None, {}),
            ("no scores", unscored, None, {}),
            ("block scores", blocked, selection.SCORE_BLOCK, {}),
            ("block scores, registers<=128", blocked, selection.SCORE_BLOCK, dict(max_registers=128)),
        ]
        if label.startswith("verify"):
            # A tile holding a whole verification row (9 queries x 4 heads) reads its KV once: without
            # scores 20% faster than 16-row tiles at b32 x 8k in session 7.
            wide = dict(block_m=64, block_n=64, max_registers=128)
            variants += [
                ("64-row tiles, block_n=64, registers<=128", batch, None, wide),
                ("64-row tiles, no scores", unscored, None, wide),
                ("64-row tiles, block scores", blocked, selection.SCORE_BLOCK, wide),
            ]
        for variant, run, block, overrides in variants:

            def check(got, got_scores, run=run, block=block):
                same = bool(torch.allclose(got[0, batch.real].float(), want[0, batch.real].float(), atol=2e-2, rtol=0))
                if block is not None:
                    sums = selection.block_masses(want_scores.nan_to_num(0.0), block)
                    want_blocks = sums.repeat_interleave(block, -1)[..., :width] / block
                    written = ~torch.isnan(want_scores)
                    # Block sums come from p rounded to bfloat16, as the output weighs it: 2^-8 per term.
                    return same and bool(torch.allclose(got_scores[written], want_blocks[written], atol=1e-6, rtol=1e-2))
                if run is batch:
                    return same and bool(torch.allclose(got_scores, want_scores, atol=1e-6, rtol=1e-3, equal_nan=True))
                return same

            timed_variant(results, f"{label} {variant}", run, check, **overrides)
        batch = unscored = blocked = None


def tuning_sweep(results: dict) -> None:
    """Tile and split knobs against the defaults (``--only tuning``): for the bench-code-lm heads
    (the headline's kernels: mixed, draft-only and plain decode steps) the session-5 defaults
    (64-position blocks, 8 items per SM) against today's (128, 4); for the Qwen3-8B shape the same
    two knobs on its verification, decode, draft and mixed steps. Outputs are checked against the
    default's."""
    gen = torch.Generator().manual_seed(3)
    bf = torch.bfloat16
    unified = ["verify"] * 14 + ["draft"] * 114
    contexts = torch.randint(2000, 16384, (128,), generator=gen).tolist()
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    small_heads = [("default", {}), ("block_n=64, 8 items/SM", dict(block_n=64, target_items=8 * sms))]
    large_heads = [("default", {}), ("block_n=128", dict(block_n=128)), ("block_n=128, 4 items/SM", dict(block_n=128, target_items=4 * sms))]
    q = "qwen3-8b"
    cases = [
        ("unified b128 bench-shape", lambda: build("bench", bf, 16, decode_rows(unified, contexts), graph_like=True, tokens=256), small_heads),
        ("draft b128 bench-shape", lambda: build("bench", bf, 16, decode_rows(["draft"] * 128, contexts), graph_like=True, tokens=128), small_heads),
        ("full decode b128 16k bench-shape", lambda: build("bench", bf, 16, decode_rows(["full"] * 128, [16384] * 128), graph_like=True, tokens=128), small_heads),
        ("unified b128 2-16k", lambda: build(q, bf, 16, decode_rows(unified, contexts), graph_like=True, tokens=256), large_heads),
        ("verify b32 8k", lambda: build(q, bf, 16, decode_rows(["verify"] * 32, [8192] * 32), graph_like=True, tokens=288), large_heads),
        ("full decode b32 8k", lambda: build(q, bf, 16, decode_rows(["full"] * 32, [8192] * 32), graph_like=True, tokens=32), large_heads),
        ("draft b128 2-16k", lambda: build(q, bf, 16, decode_rows(["draft"] * 128, contexts), graph_like=True, tokens=128), large_heads),
    ]
    for label, make, variants in cases:
        batch = make()
        want = run_attention(batch)[0].clone()
        for variant, overrides in variants:
            timed_variant(results, f"{label} {variant}", batch,
                          lambda got, _: bool(torch.allclose(got[0, batch.real].float(), want[0, batch.real].float(), atol=2e-2, rtol=0)),
                          **overrides)
        batch = None


def bench_tiles(results: dict) -> None:
    """Tile knobs for bench-code-lm's heads (6/2/64) at the headline's shape, 128 rows at 16k
    (``--only bench-tiles``): a unified step (14 verifications with block scores, 114 drafts) costs
    ~1.1 ms of attention in the throughput run against ~0.15 ms for a draft step, while its
    verification rows' KV is a ninth of a decode step's. A 16-row tile holds 5 of a verification's
    9 queries (2 tiles per row); 32 rows hold all 9. Outputs are checked against the default's."""
    bf = torch.bfloat16
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    unified = ["verify"] * 14 + ["draft"] * 114
    wide = dict(block_m=32)
    variants = [
        ("default", {}),
        ("block_m=32", wide),
        ("block_m=32, registers<=96/168", dict(wide, max_registers=96, finish_max_registers=168)),
        ("block_m=32, registers<=128/168", dict(wide, max_registers=128, finish_max_registers=168)),
        ("block_m=32, 8 items/SM", dict(wide, target_items=8 * sms)),
        ("8 items/SM", dict(target_items=8 * sms)),
        ("16 items/SM", dict(target_items=16 * sms)),
    ]
    if os.environ.get("BENCH_TILES_SPLIT"):
        # The unified step's two halves alone, padded as in its graph: would a launch of their own,
        # with tiles of their own, pay for the verification rows?
        variants = [("default", {}), ("block_m=32", wide), ("block_m=32, registers<=128/168", dict(wide, max_registers=128, finish_max_registers=168)),
                    ("block_m=64, registers<=128/168", dict(block_m=64, max_registers=128, finish_max_registers=168)),
                    ("block_m=64, block_n=64, registers<=128/168", dict(block_m=64, block_n=64, max_registers=128, finish_max_registers=168))]
        cases = [
            ("14 verify of unified 16k bench-shape block scores", lambda: build("bench", bf, 16, decode_rows(["verify"] * 14, [16384] * 14), graph_like=True, tokens=256)),
            ("114 draft of unified 16k bench-shape", lambda: build("bench", bf, 16, decode_rows(["draft"] * 114, [16384] * 114), graph_like=True, tokens=256)),
        ]
    else:
        cases = []
    cases = cases or [
        ("unified b128 16k bench-shape block scores", lambda: build("bench", bf, 16, decode_rows(unified, [16384] * 128), graph_like=True, tokens=256)),
        ("draft b128 16k bench-shape", lambda: build("bench", bf, 16, decode_rows(["draft"] * 128, [16384] * 128), graph_like=True, tokens=128)),
        ("full decode b128 16k bench-shape", lambda: build("bench", bf, 16, decode_rows(["full"] * 128, [16384] * 128), graph_like=True, tokens=128)),
    ]
    for label, make in cases:
        batch = make()
        if batch.ctx.scores is not None:
            batch = replace(batch, ctx=replace(batch.ctx, score_block=selection.SCORE_BLOCK))
        time_variants(results, label, batch, variants)
        batch = None


def lockstep_tiles(results: dict) -> None:
    """Query tiles for a lockstep verification of bench-code-lm heads (6/2/64) at the headline's
    shape, all 128 rows verifying 9 tokens at 16k with block scores (``--only lockstep-tiles``): in
    the throughput run such a step costs ~2.2x a plain decode step, whose KV read it shares. A
    16-row tile holds 5 of a row's 9 queries, so each row takes two tiles and two passes over its KV;
    32 or 64 rows hold all 9. (Session 8 measured these tiles only on a unified step's 14
    verifications, where the GPU is mostly idle.) Outputs are checked against the default's."""
    bf = torch.bfloat16
    verify = build("bench", bf, 16, decode_rows(["verify"] * 128, [16384] * 128), graph_like=True, tokens=1152)
    cases = [
        ("lockstep verify b128 16k bench-shape block scores",
         replace(verify, ctx=replace(verify.ctx, score_block=selection.SCORE_BLOCK, verification_only=True))),
        ("lockstep verify b128 16k bench-shape no scores", replace(verify, ctx=replace(verify.ctx, scores=None, verification_only=True))),
        ("full decode b128 16k bench-shape", build("bench", bf, 16, decode_rows(["full"] * 128, [16384] * 128), graph_like=True, tokens=128)),
    ]
    variants = [
        ("default", {}),
        ("block_m=32", dict(block_m=32)),
        ("block_m=32, registers<=128/168", dict(block_m=32, max_registers=128, finish_max_registers=168)),
        ("block_m=32, block_n=64", dict(block_m=32, block_n=64)),
        ("block_m=64, block_n=64, registers<=128", dict(block_m=64, block_n=64, max_registers=128)),
        ("block_m=64, registers<=128/168", dict(block_m=64, max_registers=128, finish_max_registers=168)),
    ]
    for label, batch in cases:
        time_variants(results, label, batch, variants if "verify" in label else variants[:1])
    verify = cases = None


def score_pass(results: dict) -> None:
    """The per-position PillarAttn score pass (the default "pillar" policy's), which re-reads K of
    verification rows in the finish kernel (``--only score-pass``). In session 10's profile of a
    unified b128 x 16k bench step it took 655 us of 2,144 (the attention 723): ~75 us per layer for
    14 verification rows whose K is 58 MB per layer, ~13 us at 4.3 TB/s. The same step without
    scores shows what the pass costs; the variants change its query tile, warps, stages and registers.
    The Qwen3-8B shape's lockstep verification (64 rows x 9 tokens at 8k) is timed the same way."""
    bf = torch.bfloat16
    unified = build("bench", bf, 16, decode_rows(["verify"] * 14 + ["draft"] * 114, [16384] * 128), graph_like=True, tokens=256)
    qwen = build("qwen3-8b", bf, 16, decode_rows(["verify"] * 64, [8192] * 64), graph_like=True, tokens=576)
    qwen = replace(qwen, ctx=replace(qwen.ctx, verification_only=True))
    cases = [
        ("unified b128 16k bench-shape scores", unified, [
            ("default", {}), ("score_m=64 (session 9)", dict(score_m=64)), ("finish_warps=2", dict(finish_warps=2)),
            ("finish_stages=3", dict(finish_stages=3)), ("finish_warps=2, finish_stages=3", dict(finish_warps=2, finish_stages=3)),
        ]),
        ("unified b128 16k bench-shape no scores", replace(unified, ctx=replace(unified.ctx, scores=None)), [("default", {})]),
        ("lockstep verify b64 8k qwen-shape scores", qwen, [
            ("default", {}), ("finish uncapped (session 9)", dict(finish_max_registers=0)),
            ("finish regs<=168", dict(finish_max_registers=168)), ("finish regs<=96", dict(finish_max_registers=96)),
            ("finish_stages=3", dict(finish_stages=3)),
        ]),
        ("lockstep verify b64 8k qwen-shape no scores", replace(qwen, ctx=replace(qwen.ctx, scores=None)), [("default", {})]),
    ]
    for label, batch, variants in cases:
        time_variants(results, label, batch, variants)
    unified = qwen = cases = None


def draft_splits(results: dict) -> None:
    """How draft rows' KV is cut into work items (``--only draft-splits``). A draft row reads ~5% of
    its context: at the Qwen3-8B shape (64 rows x 8k, 8 KV heads) the work-based split sizing gives
    each row two items of two 128-position blocks, whose partials the finish kernel merges in a launch
    of its own per layer. Draft-only steps (``ctx.draft_only``, as the engine marks them) now run
    unsplit when their rows fill the GPU; the batches without the mark split as before (session 10).
    Selected positions are looked up a block ahead (``index_prefetch``). Outputs are checked against
    each case's default."""
    bf = torch.bfloat16
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count

    def drafts(shape: str, rows: int, context: int, draft_only: bool) -> Batch:
        batch = build(shape, bf, 16, decode_rows(["draft"] * rows, [context] * rows), graph_like=True, tokens=rows)
        return replace(batch, ctx=replace(batch.ctx, draft_only=draft_only))

    no_prefetch = ("no index prefetch", dict(index_prefetch=False))
    cases = [
        # Unsplit, 128-position blocks left 3 programs per SM (shared memory) for 512 items: 1.29 waves (ncu, call 3).
        ("draft-only b64 8k qwen-shape", lambda: drafts("qwen3-8b", 64, 8192, True), [
            ("default", {}), ("block_n=128 (call 2)", dict(block_n=128)), ("3 stages", dict(num_stages=3)),
            ("registers<=80", dict(max_registers=80)), ("with index prefetch", dict(index_prefetch=True))]),
        ("draft-only b128 16k bench-shape", lambda: drafts("bench", 128, 16384, True), [("default", {}), no_prefetch]),
        # The finish kernel ran at 168 registers, 3 programs per SM, 17% occupancy (ncu, call 3).
        ("unified b128 16k bench-shape scores", lambda: build("bench", bf, 16, decode_rows(["verify"] * 14 + ["draft"] * 114, [16384] * 128),
                                                             graph_like=True, tokens=256), [
            ("default", {}), ("finish registers<=168 (call 4)", dict(finish_max_registers=168)),
            ("finish registers<=96", dict(finish_max_registers=96)), ("3 items/SM", dict(target_items=3 * sms))]),
    ]
    for label, make, variants in cases:
        time_variants(results, label, make(), variants)
    # Verification-only steps (whole-row tiles) at the Qwen3-8B shape, now unsplit at this size.
    qwen = build("qwen3-8b", bf, 16, decode_rows(["verify"] * 64, [8192] * 64), graph_like=True, tokens=576)
    qwen = replace(qwen, ctx=replace(qwen.ctx, verification_only=True))
    time_variants(results, "lockstep verify b64 8k qwen-shape scores", qwen, [("default", {}), ("3 stages", dict(num_stages=3))])


def time_variants(results: dict, label: str, batch: Batch, variants: list[tuple[str, dict]]) -> None:
    """Time each (name, overrides) variant on ``batch``, its outputs (and scores) checked against the default's."""
    want, want_scores = (t.clone() if t is not None else None for t in run_attention(batch))

    def check(got, got_scores):
        same = bool(torch.allclose(got[0, batch.real].float(), want[0, batch.real].float(), atol=2e-2, rtol=0))
        if want_scores is not None:
            same = same and bool(torch.allclose(got_scores, want_scores, atol=1e-6, rtol=1e-3, equal_nan=True))
        return same

    for variant, overrides in variants:
        timed_variant(results, f"{label} {variant}", batch, check, **overrides)


def write_kv_timing(results: dict) -> None:
    hkv, d = SHAPES["qwen3-8b"][1:]
    for tokens in (256, 4096):
        pool_k = torch.zeros(1 << 18, hkv, d, device=DEVICE, dtype=torch.bfloat16)
        pool_v = torch.zeros_like(pool_k)
        keys = torch.randn(1, tokens, hkv, d, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)[0]
        values = torch.randn_like(keys)
        slots = torch.randperm(pool_k.shape[0], device=DEVICE)[:tokens]
        slots[::7] = -1
        ref_k, ref_v = pool_k.clone(), pool_v.clone()
        write_kv_reference(ref_k, ref_v, keys, values, slots)
        triton_kernels.write_kv(pool_k, pool_v, keys, values, slots)
        ok = torch.equal(ref_k, pool_k) and torch.equal(ref_v, pool_v)
        ms = triton.testing.do_bench(lambda: triton_kernels.write_kv(pool_k, pool_v, keys, values, slots), warmup=10, rep=40, return_mode="median")
        nbytes = 4 * keys.numel() * keys.element_size()  # read K, V and write them
        results["write_kv"][f"T={tokens}"] = {"equal": ok, "ms": ms, "tb_per_s": nbytes / ms / 1e9}
        print(f"[write_kv] T={tokens}: equal={ok} {ms * 1e3:.1f} us", flush=True)


def selection_timing(results: dict) -> None:
    """Selection after a verification step: the Triton kernel against the PyTorch rule (same result
    required, ties included: block shares tie a block's positions), at the headline's shape (14 of
    128 requests verifying per unified step, bench-code-lm's 8 layers x 2 heads at 16k), a
    lockstep verification of all 128, and the Qwen3-8B shape (``--only selection`` runs this alone)."""
    from dataclasses import asdict

    from hf_sparsespec.attention.selection import block_masses, kernel_rule, select_tokens
    from hf_sparsespec.attention.selection_kernel import select_tokens_triton

    shapes = [("bench unified", 14, 8, 2, 16384), ("bench lockstep", 128, 8, 2, 16384), ("qwen3-8b", 14, 36, 8, 16384)]
    for label, verify_rows, layers, hkv, context in shapes:
        gen = torch.Generator(device=DEVICE).manual_seed(5)
        raw = torch.rand(verify_rows, layers, hkv, context, device=DEVICE, generator=gen) ** 8
        old_len = torch.randint(context // 2, context - 9, (verify_rows,), device=DEVICE, generator=gen)
        width = math.ceil(0.05 * context)
        count = torch.full((verify_rows,), width, device=DEVICE)
        for policy in ("pillar", "pillar_block"):
            scores = raw
            if policy == "pillar_block":
                scores = block_masses(raw, 16).repeat_interleave(16, -1)[..., :context] / 16
            want = select_tokens(scores, old_len, count, policy, width, use_triton=False)
            got = select_tokens(scores, old_len, count, policy, width, use_triton=True)
            entry = {"shape": [verify_rows, layers, hkv, context], "width": width, "equal": bool(torch.equal(got, want))}
            for name, use in (("torch", False), ("triton", True)):
                fn = lambda use=use: select_tokens(scores, old_len, count, policy, width, use_triton=use)  # noqa: E731
                entry[f"{name}_graph_ms"] = graph_ms(fn)
            rule = asdict(kernel_rule(policy))
            for chunk, warps in ((2048, 8), (4096, 8), (4096, 16), (8192, 16)):
                fn = lambda c=chunk, w=warps: select_tokens_triton(scores, old_len, count, width, **rule, chunk=c, num_warps=w)  # noqa: E731
                same = bool(torch.equal(fn(), want))
                entry[f"triton chunk {chunk} warps {warps}"] = {"graph_ms": graph_ms(fn), "equal": same}
                print(f"[selection]   chunk {chunk}, {warps} warps: {entry[f'triton chunk {chunk} warps {warps}']['graph_ms'] * 1e3:.0f} us"
                      f" {'equal' if same else 'DIFFERENT'}", flush=True)
            results["selection"][f"{label} {policy}"] = entry
            print(f"[selection] {label} {policy} {entry['shape']}: torch {entry['torch_graph_ms'] * 1e3:.0f} us, "
                  f"triton {entry['triton_graph_ms'] * 1e3:.0f} us, {'equal' if entry['equal'] else 'DIFFERENT'}", flush=True)
            save(results)


def copy_bandwidth(results: dict) -> None:
    src = torch.empty(1 << 29, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=5, rep=20, return_mode="median")
    results["copy_tb_per_s"] = 2 * src.numel() / ms / 1e9
    print(f"[copy] device copy: {results['copy_tb_per_s']:.2f} TB/s", flush=True)


OUT_FILE: Path | None = None


def save(results: dict) -> None:
    results["elapsed_s"] = time.monotonic() - START
    OUT_FILE.write_text(json.dumps(results, indent=1, default=str))


def table(results: dict) -> None:
    print("\n== correctness ==")
    for name, c in {**results["correctness"], **{f"graph replay {k}": v for k, v in results.get("graph_capture", {}).items()}}.items():
        detail = c.get("error", "").strip().splitlines()[-1:] if "error" in c else [
            f"out err {c['out_max_err']:.2e}" + (f", scores rel err {c['scores_max_rel_err']:.1e}" if "scores_max_rel_err" in c else "")]
        print(f"{'PASS' if c.get('passed') else 'FAIL'}  {name:48s} {' '.join(detail)}")
    for name, w in results["write_kv"].items():
        print(f"{'PASS' if w['equal'] else 'FAIL'}  write_kv {name:39s} {w['ms'] * 1e3:.1f} us")
    print(f"\n== timing (median; bandwidth at the graph time vs 4.3 TB/s; device copy {results.get('copy_tb_per_s', float('nan')):.2f} TB/s) ==")
    print(f"{'case':34s} {'eager us':>9s} {'graph us':>9s} {'MB':>8s} {'TB/s':>6s} {'%':>5s}  note")
    for name, t in results["timing"].items():
        if "error" in t:
            print(f"{name:34s} ERROR {t['error'].strip().splitlines()[-1]}")
            continue
        print(f"{name:34s} {t['ms'] * 1e3:9.1f} {t['graph_ms'] * 1e3:9.1f} {t['bytes'] / 1e6:8.1f} {t['tb_per_s']:6.2f} "
              f"{t['pct_of_4.3']:5.0f}  {t['note']}")
    for label, sel in results["selection"].items():
        print(f"selection {label} {sel['shape']} width {sel['width']}: torch {sel['torch_graph_ms'] * 1e3:.0f} us, "
              f"triton {sel['triton_graph_ms'] * 1e3:.0f} us per verification step, {'equal' if sel['equal'] else 'DIFFERENT'}")
    if results["skipped"]:
        print("skipped (time budget):", ", ".join(results["skipped"]))
    print(f"elapsed {results['elapsed_s']:.0f} s")


def main() -> None:
    global OUT_FILE, TIME_BUDGET_S
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--only", choices=["verify-sweep", "tuning", "bench-tiles", "lockstep-tiles", "selection", "score-pass",
                                                 "draft-splits"],
                        help="run one section instead of the whole check")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    OUT_FILE = args.out / "kernels_check.json"
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "correctness": {}, "write_kv": {}, "timing": {}, "selection": {}, "skipped": []}
    sections = [correctness, graph_capture, write_kv_timing, copy_bandwidth, timings, selection_timing]
    if args.only == "verify-sweep":
        sections = [correctness, verify_sweep]
        TIME_BUDGET_S = 200  # 8 checks, 22 variants
    elif args.only == "selection":
        sections = [selection_timing]
    elif args.only == "bench-tiles":
        sections = [bench_tiles]
        TIME_BUDGET_S = 240  # 21 variants
    elif args.only == "lockstep-tiles":
        sections = [lockstep_tiles]
        TIME_BUDGET_S = 150  # 13 variants
    elif args.only == "score-pass":
        sections = [score_pass]
        TIME_BUDGET_S = 200  # 13 variants
    elif args.only == "draft-splits":
        sections = [draft_splits]
        TIME_BUDGET_S = 150  # 13 variants
    elif args.only == "tuning":
        sections = [tuning_sweep]
        TIME_BUDGET_S = 150  # 18 variants
    for section in sections:
        try:
            section(results)
        except Exception:
            results.setdefault("section_errors", {})[section.__name__] = traceback.format_exc(limit=6)
            print(f"[error] {section.__name__}:\n{results['section_errors'][section.__name__]}", flush=True)
        save(results)
    table(results)


if __name__ == "__main__":
    main()
