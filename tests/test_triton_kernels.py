"""The Triton kernels against the PyTorch reference, on the CPU through Triton's interpreter.

``TRITON_INTERPRET=1`` only takes effect if it is set before the kernels are decorated, and other
test modules may import Triton first, so the kernels run in one child process (this file run as a
script) that checks every case and reports back as JSON; the tests here read that report.

Each case is a packed batch of random rows of every kind over a randomly paged pool whose unused
slots hold NaN; uninitialised allocations are NaN too (``fill_uninitialized_memory``), so an output
element the kernels forget to write, or a slot they should not read, shows up as a mismatch.

The selection kernel is checked against ``selection.select_tokens``'s PyTorch rule, and the fused
RMSNorm and rotary kernels of ``generation/`` the same way, against
transformers' own code and on tiny models. A third child compiles the kernels for sm_90 without a GPU (Triton ships ptxas), since the
interpreter accepts code the compiler rejects. Numbers on the GPU: benchmarks/kernels_check.py.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from conftest import run_children


# name: (page_size, kv_heads, group, head_dim, dtype, overrides for paged_attention). Batches of many
# tokens per row take the prefill tile shape, graph-like ones (a row per token) the decode shape.
CASES = {
    "page1_g1_d16_fixed_splits": (1, 2, 1, 16, "float32", dict(block_n=16, split_tokens=16)),
    # Splits that are not whole KV blocks, several query tiles per row.
    "page16_g3_d32_fixed_splits": (16, 2, 3, 32, "float32", dict(block_m=16, block_n=16, split_tokens=24)),
    # Unsplit rows of 5-query tiles over 16-position blocks: the causal edge of the unmasked stretch
    # falls on and off block boundaries.
    "page16_g3_d64_one_split": (16, 1, 3, 64, "float32", dict(block_m=16, block_n=16, split_tokens=4096)),
    "page1_g3_d32_fp16_default": (1, 2, 3, 32, "float16", {}),
    # More splits than one merge group (8) and one log-sum-exp group (16) of the finish kernel.
    "page16_g3_d32_many_splits": (16, 2, 3, 32, "float32", dict(block_n=16, split_tokens=5)),
    # Splits sized on the device from the step's work (G=1 lets short rows split).
    "page16_g1_d64_fp16_adaptive_splits": (16, 2, 1, 64, "float16", dict(block_m=64, block_n=16, target_items=64)),
    # As a captured CUDA graph sees it: padding rows up to one row per token, max_kv_len far above.
    "graph_like_page16_g3_d16": (16, 2, 3, 16, "float32", dict(block_n=16, target_items=64, graph_like=True)),
    "graph_like_page1_g1_d32_default": (1, 2, 1, 32, "float32", dict(graph_like=True)),
    # Scores at 16-position block granularity, summed in the attention pass: over fixed splits and
    # several query tiles per row, over the decode shape's own splits, and in 128-row prefill tiles.
    "page16_g3_d32_block_scores_splits": (16, 2, 3, 32, "float32", dict(block_m=16, block_n=16, split_tokens=32,
                                                                         score_block=16)),
    "graph_like_page1_g1_d32_block_scores": (1, 2, 1, 32, "float32", dict(graph_like=True, score_block=16)),
    "page1_g3_d32_fp16_block_scores": (1, 2, 3, 32, "float16", dict(score_block=16)),
    # Any block size that divides the KV block, not only SCORE_BLOCK: 8 positions.
    "graph_like_page16_g3_d32_block_scores_of_8": (16, 2, 3, 32, "float32", dict(graph_like=True, score_block=8)),
    # The tiles of a verification-only step at more than 64 dims: 64 rows (16 queries x 4 heads) over
    # 64-position blocks, with and without block scores (the hint sizes tiles; results must not move).
    "graph_like_page16_g4_d128_whole_row_tiles": (16, 1, 4, 128, "float32", dict(graph_like=True, verification_only=True)),
    "page16_g4_d128_whole_row_tiles_block_scores": (16, 1, 4, 128, "float32", dict(verification_only=True, score_block=16)),
    # A score tile sized for 2-query verifications (16 rows: 5 queries x 3 heads) over longer rows: the
    # score pass then takes several query tiles per row, each adding to what the last one stored.
    "page16_g3_d32_score_tiles_short_verify_len": (16, 2, 3, 32, "float32", dict(verify_len=2)),
    # A step of sparse drafts only: rows unsplit (one program per row and KV head), no merge launch;
    # over 16-position blocks, so the selected stretch's positions are looked up a block ahead.
    "graph_like_page16_g3_d32_draft_only_unsplit": (16, 2, 3, 32, "float32", dict(graph_like=True, draft_only=True, block_n=16)),
    # The selected stretch without the look-ahead (benchmark A/B knob).
    "page16_g3_d32_no_index_prefetch": (16, 2, 3, 32, "float32", dict(block_n=16, index_prefetch=False)),
    # Whole-row verification tiles of a batch whose rows fill the GPU by themselves: unsplit, scores by
    # the finish kernel alone.
    "page16_g4_d128_whole_row_tiles_unsplit": (16, 1, 4, 128, "float32", dict(verification_only=True, verify_len=2)),
}
# bfloat16 attention is checked only on the GPU (benchmarks/kernels_check.py): Triton 3.9's interpreter
# computes tl.dot on bfloat16 operands wrongly (a lone 16x16 product is off by orders of magnitude).

# name: (pool dtype, input dtype, heads, head_dim). float32 into float16 exercises the cast; the
# interpreter rounds float32 to bfloat16 differently from torch, so bfloat16 is written as is.
WRITE_KV_CASES = {
    "float32_h2_d16": ("float32", "float32", 2, 16),
    "float16_from_float32_h3_d64": ("float16", "float32", 3, 64),
    "bfloat16_h2_d32": ("bfloat16", "bfloat16", 2, 32),
}


# ---- the child process ---------------------------------------------------------------------------
def _rows_spec(rng, drafts_only=False):
    """(kind, q_len, kv_len, tail_start, sel_count, wants_scores) of a mixed batch, or of its sparse
    draft rows alone."""
    rows = [
        ("full", 7, 7, 0, 0, False),  # first prefill chunk
        ("draft", 1, 45, 38, 6, False),  # selection plus a tail of 7
        ("full", 5, 30, 0, 0, False),  # later prefill chunk
        ("full", 4, 40, 0, 0, True),  # verification with scores
        ("pad", 0, 0, 0, 0, False),
        ("draft", 1, 21, 20, 0, False),  # empty selection: tail only
        ("full", 3, 26, 0, 0, True),  # second verification with scores
        ("full", 1, 19, 0, 0, False),  # a draft before the first verification
        ("draft", 2, 50, 41, int(rng.integers(10, 20)), False),  # two draft tokens in one row
        ("full", 6, 38, 0, 0, False),  # verification without scores
        ("full", 23, 48, 0, 0, True),  # scores over several query tiles
        ("full", 1, 90, 0, 0, False),  # a long decode row: splits
        ("draft", 1, 120, 100, 30, False),  # a long draft: splits over selection and tail
    ]
    return [r for r in rows if r[0] == "draft" and r[4] > 0] if drafts_only else rows


def build_batch(page_size, kv_heads, group, head_dim, dtype, layers=2, layer=1, seed=0, graph_like=False, drafts_only=False):
    """A random packed batch: (query, k_pool, v_pool, ctx)."""
    import numpy as np
    import torch

    from hf_sparsespec.attention.context import StepContext

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    spec = _rows_spec(rng, drafts_only)
    num_rows = len(spec)
    max_kv = max(r[2] for r in spec)
    pages_per_row = -(-max_kv // page_size)
    num_pages = pages_per_row * num_rows + 3
    pool_shape = (layers, num_pages * page_size, kv_heads, head_dim)
    k_all = torch.full(pool_shape, float("nan"), dtype=dtype)
    v_all = torch.full(pool_shape, float("nan"), dtype=dtype)
    perm = rng.permutation(num_pages)
    block_tables = torch.full((num_rows, pages_per_row + 2), -1, dtype=torch.int64)
    sel_width = 32
    num_slots = num_rows + 1
    selection = torch.full((num_slots, layers, kv_heads, sel_width), -1, dtype=torch.int32)
    sel_count = torch.zeros(num_slots, dtype=torch.int32)
    meta = {k: [] for k in ("q_start", "q_len", "kv_len", "is_draft", "tail_start", "sel_slot", "score_row")}
    slot_mapping, token, num_scores = [], 0, 0
    for r, (kind, n, kv, tail, count, wants_scores) in enumerate(spec):
        pages = perm[r * pages_per_row : r * pages_per_row + -(-kv // page_size)]
        block_tables[r, : len(pages)] = torch.as_tensor(pages)
        slots = torch.as_tensor(pages).repeat_interleave(page_size) * page_size + torch.arange(len(pages) * page_size) % page_size
        slots = slots[:kv]
        k_all[:, slots] = torch.randn(layers, kv, kv_heads, head_dim).to(dtype)
        v_all[:, slots] = torch.randn(layers, kv, kv_heads, head_dim).to(dtype)
        slot_mapping += slots[kv - n :].tolist()
        sel_slot = (r + 1) % num_slots  # slots differ from row indices
        if kind == "draft":
            sel_count[sel_slot] = count
            for lay in range(layers):
                for h in range(kv_heads):
                    chosen = np.sort(rng.choice(tail, size=count, replace=False))
                    selection[sel_slot, lay, h, :count] = torch.as_tensor(chosen, dtype=torch.int32)
        meta["q_start"].append(token if n else 0)
        meta["q_len"].append(n)
        meta["kv_len"].append(kv)
        meta["is_draft"].append(kind == "draft")
        meta["tail_start"].append(tail)
        meta["sel_slot"].append(sel_slot)
        meta["score_row"].append(num_scores if wants_scores else -1)
        num_scores += wants_scores
        token += n
    num_padding_tokens = 3
    slot_mapping += [-1] * num_padding_tokens
    num_tokens = token + num_padding_tokens
    if graph_like:
        for name, value in dict(q_start=0, q_len=0, kv_len=0, is_draft=False, tail_start=0, sel_slot=0, score_row=-1).items():
            meta[name] += [value] * (num_tokens - num_rows)
        block_tables = torch.cat([block_tables, torch.full((num_tokens - num_rows, block_tables.shape[1]), -1)])
    # Query as transformers hands it over: a (1, Hq, T, D) transpose of a (1, T, Hq, D) tensor.
    query = torch.randn(1, num_tokens, kv_heads * group, head_dim).to(dtype).transpose(1, 2)
    # Mixed index dtypes: the engine uploads int64, the context documents int32.
    ctx = StepContext(
        cache=SimpleNamespace(page_size=page_size),
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64),
        q_start=torch.tensor(meta["q_start"], dtype=torch.int32),
        q_len=torch.tensor(meta["q_len"], dtype=torch.int64),
        kv_len=torch.tensor(meta["kv_len"], dtype=torch.int32),
        block_tables=block_tables,
        is_draft=torch.tensor(meta["is_draft"], dtype=torch.bool),
        tail_start=torch.tensor(meta["tail_start"], dtype=torch.int64),
        sel_slot=torch.tensor(meta["sel_slot"], dtype=torch.int64),
        selection=selection,
        sel_count=sel_count,
        score_row=torch.tensor(meta["score_row"], dtype=torch.int64),
        scores=torch.full((num_scores + 1, layers, kv_heads, max_kv + 5), float("nan")),
        max_kv_len=4096 if graph_like else max_kv + 3,
        use_triton=True,
    )
    return query, k_all[layer], v_all[layer], ctx


def _check_attention(case):
    import dataclasses

    import torch

    from hf_sparsespec.attention import triton_kernels
    from hf_sparsespec.attention.reference import reference_attention

    page_size, kv_heads, group, head_dim, dtype_name, overrides = CASES[case]
    overrides = dict(overrides)
    graph_like = overrides.pop("graph_like", False)
    dtype = getattr(torch, dtype_name)
    layer = 1
    draft_only = overrides.pop("draft_only", False)
    query, k_pool, v_pool, ctx = build_batch(page_size, kv_heads, group, head_dim, dtype, layer=layer, graph_like=graph_like,
                                             drafts_only=draft_only)
    ctx = dataclasses.replace(ctx, score_block=overrides.pop("score_block", 1),
                              verification_only=overrides.pop("verification_only", False),
                              verify_len=overrides.pop("verify_len", 0), draft_only=draft_only)
    scale = head_dim**-0.5
    ref_ctx = dataclasses.replace(ctx, scores=ctx.scores.clone(), use_triton=False)
    # The reference on upcast inputs: the kernels accumulate in fp32 as well.
    expected = reference_attention(query.float(), k_pool.float(), v_pool.float(), ref_ctx, layer, scale)
    got = triton_kernels.paged_attention(query, k_pool, v_pool, ctx, layer, scale, **overrides)
    real = torch.zeros(query.shape[2], dtype=torch.bool)
    for start, n in zip(ctx.q_start.tolist(), ctx.q_len.tolist()):
        real[start : start + n] = True
    tol = {"float32": 2e-5, "float16": 2e-3}[dtype_name]
    out_err = (got[0, real].float() - expected[0, real]).abs().max().item()
    written = ~torch.isnan(ctx.scores)
    same_cells = torch.equal(written, ~torch.isnan(ref_ctx.scores))
    if not same_cells:
        score_err = float("inf")
    elif bool(written.any()):
        score_err = (ctx.scores[written] - ref_ctx.scores[written]).abs().max().item()
    else:
        score_err = 0.0
    return {
        "out_err": out_err,
        "out_tol": tol * 4,
        "out_finite": bool(torch.isfinite(got[0, real]).all()),
        "scores_same_cells": same_cells,
        "score_err": score_err,
        "score_tol": tol,
        "scores_written": int(written.sum()),
    }


def _check_write_kv(case):
    import torch

    from hf_sparsespec.attention import triton_kernels
    from hf_sparsespec.cache.paged_cache import write_kv_reference

    dtype_name, input_dtype_name, heads, head_dim = WRITE_KV_CASES[case]
    dtype, input_dtype = getattr(torch, dtype_name), getattr(torch, input_dtype_name)
    torch.manual_seed(1)
    pool_shape = (40, heads, head_dim)
    k_pool = torch.full(pool_shape, float("nan"), dtype=dtype)
    v_pool = torch.full(pool_shape, float("nan"), dtype=dtype)
    slot_mapping = torch.tensor([7, -1, 3, 39, 0, -1, 12, 21], dtype=torch.int64)
    # [H, T, D] views of (1, H, T, D) transposes, as the model passes key_states[0].
    keys = torch.randn(1, len(slot_mapping), heads, head_dim).to(input_dtype).transpose(1, 2)[0]
    values = torch.randn(1, len(slot_mapping), heads, head_dim).to(input_dtype).transpose(1, 2)[0]
    k_ref, v_ref = k_pool.clone(), v_pool.clone()
    write_kv_reference(k_ref, v_ref, keys, values, slot_mapping)
    triton_kernels.write_kv(k_pool, v_pool, keys, values, slot_mapping)
    return {"k_equal": torch.equal(k_pool.nan_to_num(7.0), k_ref.nan_to_num(7.0)),
            "v_equal": torch.equal(v_pool.nan_to_num(7.0), v_ref.nan_to_num(7.0))}


# (shape, dtype): odd widths and row counts exercise the masks; [T, H, D] is a q/k norm.
NORM_CASES = {
    "rms_norm fp32 384": ((5, 384), "float32"),
    "rms_norm bf16 3d head_dim 64": ((7, 3, 64), "bfloat16"),
    "rms_norm fp16 96 wide": ((33, 96), "float16"),
    # Per-head norms of a fused projection's query columns: tokens and heads do not merge into rows.
    "rms_norm bf16 strided heads": ((7, 3, 64), "bfloat16"),
    # A residual add and the norm of its sum (a decoder layer's hidden states: 1 x tokens x width).
    "add_rms_norm fp32 384": ((1, 5, 384), "float32"),
    "add_rms_norm bf16 4096": ((1, 3, 4096), "bfloat16"),
}


def _check_rms_norm(case):
    import torch

    from hf_sparsespec.generation.fused_norm import add_rms_norm, rms_norm, rms_norm_reference

    shape, dtype_name = NORM_CASES[case]
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(2)
    x = (torch.randn(shape) * 4).to(dtype)
    if "strided" in case:
        tokens, heads, dim = shape
        x = torch.cat([x.view(tokens, heads * dim), torch.randn(tokens, 2 * dim).to(dtype)], dim=1)[:, : heads * dim]
        x = x.view(tokens, heads, dim)
        assert not x.is_contiguous()
    weight = (torch.rand(shape[-1]) + 0.5).to(dtype)
    report = {}
    if case.startswith("add_rms_norm"):
        residual = (torch.randn(shape) * 4).to(dtype)
        total, got = add_rms_norm(x, residual, weight, 1e-6)
        expected_total = residual + x
        expected = rms_norm_reference(expected_total, weight, 1e-6)
        # The interpreter rounds float32 to bfloat16 by truncation: one step off where the GPU is exact.
        report["sum_err"] = ((total.float() - expected_total.float()).abs() / expected_total.float().abs().clamp(min=1)).max().item()
        report["sum_tol"] = {"float32": 0.0, "bfloat16": 2 ** -7}[dtype_name]
    else:
        got, expected = rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6)
    # Two roundings of the input dtype (normalised row, then weight product) may each flip by one
    # unit: the two compute the mean in different orders.
    tol = {"float32": 1e-6, "bfloat16": 1.6e-2, "float16": 2e-3}[dtype_name]
    if report:
        tol *= 1.5  # and the sum the norm reads may be a step off
    return {**report, "dtype_ok": got.dtype == expected.dtype, "shape_ok": got.shape == expected.shape,
            "err": ((got.float() - expected.float()).abs() / expected.float().abs().clamp(min=1)).max().item(), "tol": tol}


# (heads, tokens, head_dim, dtype, with the head norm), queries and keys laid out as the model passes
# them; with the norm, as Qwen3's q_norm and k_norm get them: strided slices of one fused projection.
ROTARY_CASES = {
    "rotary fp32 d64": (4, 7, 64, "float32", False),
    "rotary bf16 d128": (2, 3, 128, "bfloat16", False),
    "rotary with head norms fp32 d64": (4, 7, 64, "float32", True),
    "rotary with head norms bf16 d128": (2, 3, 128, "bfloat16", True),
}


def _check_rotary(case):
    import torch
    from transformers.models.qwen3 import modeling_qwen3

    from hf_sparsespec.generation.fused_norm import rms_norm_reference
    from hf_sparsespec.generation.fused_rotary import rotate

    heads, tokens, dim, dtype_name, with_norm = ROTARY_CASES[case]
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(3)
    kv_heads = max(1, heads // 2)  # fewer KV heads, as in GQA
    if with_norm:
        fused = torch.randn(1, tokens, (heads + 2 * kv_heads) * dim).to(dtype)
        q = fused[..., : heads * dim].view(1, tokens, heads, dim).transpose(1, 2)
        k = fused[..., heads * dim: (heads + kv_heads) * dim].view(1, tokens, kv_heads, dim).transpose(1, 2)
        weights = [(torch.rand(dim) + 0.5).to(dtype) for _ in range(2)]
        norms = ((weights[0], 1e-6), (weights[1], 1e-5))
    else:
        q = torch.randn(1, tokens, heads, dim).to(dtype).transpose(1, 2)
        k = torch.randn(1, tokens, kv_heads, dim).to(dtype).transpose(1, 2)
        norms = None
    angles = torch.rand(1, tokens, dim // 2) * 6.3
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    q_in, k_in = (q, k) if norms is None else (rms_norm_reference(x, *norm) for x, norm in zip((q, k), norms))
    expected = modeling_qwen3.apply_rotary_pos_emb(q_in, k_in, cos, sin)
    got = rotate(q, k, cos, sin, norms)
    # transformers rounds each product and the sum to the input dtype; the kernel rounds once (after
    # the norm's two roundings, which the interpreter makes by truncation: up to 4 bfloat16 steps).
    tol = {"float32": 1e-5, "bfloat16": 3.2e-2 if with_norm else 2e-2}[dtype_name]
    err = max(((g.float() - e.float()).abs() / e.float().abs().clamp(min=1)).max().item() for g, e in zip(got, expected))
    return {"layout_ok": all(g.transpose(1, 2).is_contiguous() for g in got), "err": err, "tol": tol}


# name: (policy, tied scores): each checks 3 verifications x 2 layers x 2 heads, over more positions
# than one kernel chunk, a row taking every candidate and a row taking none.
SELECT_CASES = {f"select {policy}{' tied' if tied else ''}": (policy, tied)
                for policy in ("paper", "window", "pillar", "pillar_block") for tied in (False, True)}


def _check_select(case):
    import torch

    from hf_sparsespec.attention import selection

    policy, tied = SELECT_CASES[case]
    torch.manual_seed(4)
    n = 2500
    scores = torch.rand(3, 2, 2, n)
    if tied:  # block shares rounded coarsely: long runs of equal priorities across the threshold
        scores = (selection.block_masses(scores, 16).repeat_interleave(16, -1)[..., :n] / 16).round(decimals=2)
    old_len, count = torch.tensor([2500, 1100, 7]), torch.tensor([300, 1100, 0])
    want = selection.select_tokens(scores, old_len, count, policy, 1200, use_triton=False)
    got = selection.select_tokens(scores, old_len, count, policy, 1200, use_triton=True)
    return {"equal": torch.equal(got, want), "mismatches": int((got != want).sum()), "dtype_ok": got.dtype == torch.int32}


FUSED_NORMS_CASE = "fused norms on a tiny model"
FUSED_ROTARY_CASE = "fused rotary on tiny models"


def _check_fused_rotary(_case):
    import sys

    import torch

    from hf_sparsespec.generation import fused_rotary
    from hf_sparsespec.generation.fused_norm import FusedNorms
    from hf_sparsespec.generation.fused_rotary import FusedRotary

    from conftest import tiny_model

    calls = []
    kernel = fused_rotary.rotate
    # The kernel, not the fallback, ran; and whether it normalised the heads on the way.
    fused_rotary.rotate = lambda *args: calls.append(len(args) > 4) or kernel(*args)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    report = {}

    def run(model):
        module = sys.modules[type(model.model.layers[0].self_attn).__module__]
        original = module.apply_rotary_pos_emb
        with torch.no_grad():
            expected = model(ids).logits
            norms = FusedNorms(model)
            fused = FusedRotary(model, norms)
            calls.clear()
            with norms.swapped(), fused.swapped():
                got = model(ids).logits
                swapped = module.apply_rotary_pos_emb is not original
            after = model(ids).logits
        restored = module.apply_rotary_pos_emb is original and not any("forward" in m.__dict__ for m in model.modules())
        return {"modules": len(fused.modules), "head_norms": len(fused.head_norms), "swapped": swapped,
                "kernel_calls": len(calls), "normalising_calls": sum(calls), "restored": restored,
                "err": (got - expected).abs().max().item(), "after_identical": torch.equal(after, expected)}

    for arch in ("qwen3", "llama"):
        report[arch] = run(tiny_model(arch))

    # An attention class overriding forward is not the code the deferral was written for.
    model = tiny_model("qwen3")
    attn_class = type(model.model.layers[0].self_attn)
    subclass = type("CustomAttention", (attn_class,), {"__module__": attn_class.__module__,
                                                       "forward": lambda self, *a, **kw: attn_class.forward(self, *a, **kw)})
    for layer in model.model.layers:
        layer.self_attn.__class__ = subclass
    report["subclass"] = run(model)

    # A norm's output used elsewhere than the rotary function is caught at the end of the step.
    model = tiny_model("qwen3")
    attn = model.model.layers[0].self_attn
    norms = FusedNorms(model)
    fused = FusedRotary(model, norms)
    try:
        with torch.no_grad(), norms.swapped(), fused.swapped():
            attn.q_norm(torch.randn(1, 2, 4, attn.head_dim))  # no rotary call receives this one
        report["unapplied_norm_error"] = None
    except RuntimeError as exc:
        report["unapplied_norm_error"] = str(exc)
    report["unapplied_restored"] = not any("forward" in m.__dict__ for m in model.modules())

    def partial_rotary(q, k, cos, sin, unsqueeze_dim=1):  # rotates only half of each head, as Phi does
        half = q.shape[-1] // 2
        module = sys.modules[attn_class.__module__]
        rotated = module.apply_rotary_pos_emb(q[..., :half], k[..., :half], cos[..., :half], sin[..., :half])
        return tuple(torch.cat((r, x[..., half:]), dim=-1) for r, x in zip(rotated, (q, k)))

    from hf_sparsespec.generation.fused_rotary import _reproduces

    report["partial_rotary_refused"] = not _reproduces(partial_rotary, torch.float32, torch.device("cpu"))
    return report


def _check_fused_norms(_case):
    import torch
    from torch import nn

    from hf_sparsespec.generation.fused_norm import FusedNorms

    from conftest import tiny_model

    class GemmaLikeRMSNorm(nn.Module):  # scales by 1 + weight: not the kernel's formula
        def __init__(self, n):
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.zeros(n)), 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)

    model = tiny_model("qwen3")
    model.extra_norm = GemmaLikeRMSNorm(64)
    hooked = model.model.norm
    hooked_forward = hooked.forward
    hooked.forward = lambda x: hooked_forward(x) * 1.0  # an instance-level forward installed by someone else
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        expected = model(ids).logits
        norms = FusedNorms(model)
        with norms.swapped():
            got = model(ids).logits
            inside = model.extra_norm.forward.__func__ is GemmaLikeRMSNorm.forward
        after = model(ids).logits
    return {
        "swapped": len(norms.modules),  # 2 layers x (input, post-attention, q, k) + final
        "gemma_kept": inside and model.extra_norm not in norms.modules,
        "hook_restored": hooked.__dict__.get("forward") is not None and "forward" not in model.model.layers[0].input_layernorm.__dict__,
        "err": (got - expected).abs().max().item(),
        "after_identical": torch.equal(after, expected),
    }


FUSED_RESIDUALS_CASE = "fused residual adds on tiny models"


def _check_fused_residuals(_case):
    import torch

    from hf_sparsespec.generation import fused_residual
    from hf_sparsespec.generation.fused_norm import FusedNorms
    from hf_sparsespec.generation.fused_residual import FusedResiduals

    from conftest import tiny_model

    calls = []
    kernel = fused_residual.add_rms_norm
    fused_residual.add_rms_norm = lambda *args: calls.append(1) or kernel(*args)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])

    def run(model):
        input_norm_calls = []
        counted = model.model.layers[1].input_layernorm
        with torch.no_grad():
            expected = model(ids).logits
            norms = FusedNorms(model)
            fused = FusedResiduals(model, norms)
            calls.clear()
            with norms.swapped(), fused.swapped():
                forward = counted.forward  # the fused norm kernel's, counted (a hook would exclude the layer)
                counted.forward = lambda x: input_norm_calls.append(1) or forward(x)
                got = model(ids).logits
                counted.forward = forward
            after = model(ids).logits
        return {"layers": len(fused.layers), "kernel_calls": len(calls), "second_input_norm_calls": len(input_norm_calls),
                "restored": not any("forward" in m.__dict__ for m in model.modules()),
                "err": (got - expected).abs().max().item(), "after_identical": torch.equal(after, expected)}

    report = {arch: run(tiny_model(arch)) for arch in ("qwen3", "llama")}
    # A layer whose norm has a hook keeps its own forward (the fused one would skip the hook).
    model = tiny_model("qwen3")
    model.model.layers[0].post_attention_layernorm.register_forward_hook(lambda *a: None)
    report["hooked_layers"] = len(FusedResiduals(model, FusedNorms(model)).layers)
    return report


# Compiled (not interpreted) for an H100/H200, as the engine uses them: catches what the interpreter
# lets through (types, layouts, lowering). Integer strides are marked divisible by 16, as the launcher
# specialises head-dim multiples, so this is the vectorised code path the GPU gets.
SM90_KERNELS = {
    "attention_decode": ("_attention_kernel", dict(BLOCK_M=16, QPT=4, PAGE=16, BLOCK_N=128, WRITE_LSE=True, SCORE_BLOCK=0,
                                                   SCORE_COLS=16, DOT_PRECISION="tf32", PREFETCH=True), 4),
    "attention_decode_block_scores": ("_attention_kernel", dict(BLOCK_M=16, QPT=4, PAGE=16, BLOCK_N=128, WRITE_LSE=True,
                                                                SCORE_BLOCK=16, SCORE_COLS=16, DOT_PRECISION="tf32", PREFETCH=True), 4),
    # The register caps paged_attention puts on 16-row tiles: more resident programs, a few spills.
    "attention_decode_96_registers": ("_attention_kernel", dict(BLOCK_M=16, QPT=4, PAGE=16, BLOCK_N=128, WRITE_LSE=True,
                                                                SCORE_BLOCK=0, SCORE_COLS=16, DOT_PRECISION="tf32", PREFETCH=True), 4, 2, 96),
    # A verification-only step's whole-row tiles, capped as paged_attention caps them.
    "attention_whole_row_block_scores": ("_attention_kernel", dict(BLOCK_M=64, QPT=16, PAGE=16, BLOCK_N=64, WRITE_LSE=True,
                                                                   SCORE_BLOCK=16, SCORE_COLS=16, DOT_PRECISION="tf32", PREFETCH=True), 8, 2, 128),
    "attention_prefill": ("_attention_kernel", dict(BLOCK_M=128, QPT=32, PAGE=1, BLOCK_N=64, WRITE_LSE=False, SCORE_BLOCK=0,
                                                    SCORE_COLS=16, DOT_PRECISION="tf32", PREFETCH=True), 8),
    "finish": ("_finish_kernel", dict(BLOCK_M=16, QPT=4, PAGE=16, BLOCK_N=128, MERGE_GROUP=4, SCORE_M=64, SCORE_Q=16,
                                      WRITE_SCORES=True, SCORE_BLOCK=0, DOT_PRECISION="tf32"), 4),
    "finish_168_registers": ("_finish_kernel", dict(BLOCK_M=16, QPT=4, PAGE=16, BLOCK_N=128, MERGE_GROUP=4, SCORE_M=64, SCORE_Q=16,
                                                    WRITE_SCORES=True, SCORE_BLOCK=0, DOT_PRECISION="tf32"), 4, 2, 168),
    "finish_block_scores": ("_finish_kernel", dict(BLOCK_M=16, QPT=4, PAGE=16, BLOCK_N=128, MERGE_GROUP=4, SCORE_M=64,
                                                   SCORE_Q=16, WRITE_SCORES=True, SCORE_BLOCK=16, DOT_PRECISION="tf32"), 4),
    "write_kv": ("_write_kv_kernel", dict(H=8, H_PAD=8, D=128, D_PAD=128), 4),
    "rms_norm": ("_rms_norm_kernel", dict(BLOCK_N=4096, ROWS=1, ADD=False), 4),
    "add_rms_norm": ("_rms_norm_kernel", dict(BLOCK_N=4096, ROWS=1, ADD=True), 4),
    "rotary": ("_rotary_kernel", dict(HALF=64, BLOCK=64, NORM=False), 1),
    "rotary_with_head_norms": ("_rotary_kernel", dict(HALF=64, BLOCK=64, NORM=True), 1),
    "select_pillar": ("_select_kernel", dict(SINKS=0, LOOKBACK=8, LOOKAHEAD=1, BY_POSITION=False, CHUNK=1024), 4),
    "select_window": ("_select_kernel", dict(SINKS=4, LOOKBACK=0, LOOKAHEAD=0, BY_POSITION=True, CHUNK=1024), 4),
}


def _compile_sm90(name: str) -> dict:
    compile_sm90(*SM90_KERNELS[name])
    return {"compiled": True}


def compile_sm90(kernel_name: str, constexprs: dict, warps: int, stages: int = 2, max_registers: int | None = None):
    """Compile one kernel for sm_90 without a GPU (the attention kernels at Qwen3-8B's shapes) and
    return it; ``TRITON_DUMP_PTXAS_LOG=1`` prints its register and spill counts, ``.metadata.shared``
    holds its shared memory (benchmarks/kernel_registers.py)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hf_sparsespec.attention import selection_kernel, triton_kernels
    from hf_sparsespec.generation import fused_linear, fused_norm, fused_rotary

    modules = (triton_kernels, selection_kernel, fused_norm, fused_rotary, fused_linear)
    fn = next(getattr(m, kernel_name) for m in modules if hasattr(m, kernel_name))
    if kernel_name in ("_attention_kernel", "_finish_kernel"):  # Qwen3-8B: 32 query heads over 8 KV heads of 128
        constexprs = dict(G=4, HKV=8, HQ=32, D=128, D_PAD=128, R_PAD=256, SPLIT_COST=16, **constexprs)
    ints = {"bt_ptr": "i64", "sel_ptr": "i32", "sel_count_ptr": "i32", "is_draft_ptr": "i1", "slot_ptr": "i64",
            "old_len_ptr": "i64", "count_ptr": "i64", "keys_ptr": "i32", "out_ptr": "i32" if kernel_name == "_select_kernel" else "bf16"}
    metadata = ("q_start_ptr", "q_len_ptr", "kv_len_ptr", "tail_ptr", "sel_slot_ptr", "score_row_ptr")
    fp32 = ("lse_ptr", "part_o_ptr", "part_lse_ptr", "scores_ptr", "blse_ptr")
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*" + ints.get(arg, "i64" if arg in metadata else "fp32" if arg in fp32 else "bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = "fp32" if arg in ("qk_scale", "eps", "q_eps", "k_eps", "recent_fraction") else "i32"
            if arg.startswith("stride_") and not arg.startswith(("stride_bt", "stride_sel", "stride_sc")):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages,
                                   **({"maxnreg": max_registers} if max_registers else {})})


def _child(names: list[str]) -> None:
    from conftest import run_checks

    run_checks({
        **{name: _compile_sm90 for name in SM90_KERNELS}, **{name: _check_attention for name in CASES},
        **{name: _check_write_kv for name in WRITE_KV_CASES}, **{name: _check_rms_norm for name in NORM_CASES},
        **{name: _check_rotary for name in ROTARY_CASES}, **{name: _check_select for name in SELECT_CASES},
        FUSED_NORMS_CASE: _check_fused_norms,
        FUSED_ROTARY_CASE: _check_fused_rotary,
        FUSED_RESIDUALS_CASE: _check_fused_residuals,
    }, names)


# ---- the tests -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def results():
    pytest.importorskip("triton")
    names = (list(CASES) + list(WRITE_KV_CASES) + list(NORM_CASES) + [FUSED_NORMS_CASE] + list(ROTARY_CASES)
             + [FUSED_ROTARY_CASE, FUSED_RESIDUALS_CASE] + list(SELECT_CASES))
    # Sized for the two cores of a small CI machine.
    return run_children(__file__, [(names[0::2], True), (names[1::2], True), (list(SM90_KERNELS), False)])


@pytest.mark.parametrize("case", list(CASES))
def test_paged_attention_matches_reference(results, case):
    r = results[case]
    assert "error" not in r, r.get("error")
    assert r["out_finite"], "an output of a real row is missing or not finite"
    assert r["out_err"] <= r["out_tol"], r
    assert r["scores_same_cells"], "scores written where the reference writes none, or missing"
    # A draft-only batch holds no verification row: nothing may be written.
    assert (r["scores_written"] > 0) != bool(CASES[case][5].get("draft_only")), r
    assert r["score_err"] <= r["score_tol"], r


@pytest.mark.parametrize("case", list(WRITE_KV_CASES))
def test_write_kv_matches_reference(results, case):
    r = results[case]
    assert "error" not in r, r.get("error")
    assert r["k_equal"] and r["v_equal"], r


@pytest.mark.parametrize("case", list(NORM_CASES))
def test_rms_norm_matches_transformers_formula(results, case):
    r = results[case]
    assert "error" not in r, r.get("error")
    assert r["dtype_ok"] and r["shape_ok"], r
    assert r["err"] <= r["tol"], r
    assert r.get("sum_err", 0.0) <= r.get("sum_tol", 0.0), r


def test_fused_norms_swap_only_what_they_reproduce(results):
    r = results[FUSED_NORMS_CASE]
    assert "error" not in r, r.get("error")
    assert r["swapped"] == 9, r
    assert r["gemma_kept"], "a norm with another formula must keep its own forward"
    assert r["hook_restored"], "forwards installed on instances must come back after the step"
    assert r["err"] <= 1e-5 and r["after_identical"], r


def test_fused_residual_adds_fold_into_the_norms_after_them(results):
    r = results[FUSED_RESIDUALS_CASE]
    assert "error" not in r, r.get("error")
    for arch in ("qwen3", "llama"):
        assert r[arch]["layers"] == 2 and r[arch]["restored"], r
        # Layer 0: both adds (the second with layer 1's input norm, which layer 1 then skips); layer 1:
        # the post-attention one (its MLP add has no following layer).
        assert r[arch]["kernel_calls"] == 3 and r[arch]["second_input_norm_calls"] == 0, r
        assert r[arch]["err"] <= 1e-5 and r[arch]["after_identical"], r
    assert r["hooked_layers"] == 1, "a layer whose norm carries a hook must keep its own forward"


@pytest.mark.parametrize("case", list(ROTARY_CASES))
def test_rotary_matches_transformers(results, case):
    r = results[case]
    assert "error" not in r, r.get("error")
    assert r["layout_ok"], "the output must keep the input's (transposed) layout"
    assert r["err"] <= r["tol"], r


def test_fused_rotary_swaps_only_what_it_reproduces(results):
    r = results[FUSED_ROTARY_CASE]
    assert "error" not in r, r.get("error")
    for arch in ("qwen3", "llama", "subclass"):
        assert r[arch]["modules"] == 1 and r[arch]["swapped"] and r[arch]["restored"], r
        assert r[arch]["kernel_calls"] == 2, r  # one launch per layer for its queries and keys
        assert r[arch]["err"] <= 1e-5 and r[arch]["after_identical"], r
    # Qwen3's q_norm and k_norm run inside the rotary launch; Llama has none; a subclass keeps its own.
    assert (r["qwen3"]["head_norms"], r["qwen3"]["normalising_calls"]) == (4, 2), r
    assert (r["llama"]["head_norms"], r["llama"]["normalising_calls"]) == (0, 0), r
    assert (r["subclass"]["head_norms"], r["subclass"]["normalising_calls"]) == (0, 0), r
    assert r["unapplied_norm_error"] and "never applied" in r["unapplied_norm_error"], r
    assert r["unapplied_restored"], r
    assert r["partial_rotary_refused"], "a rotary variant the kernel does not compute must keep its own code"


@pytest.mark.parametrize("case", list(SELECT_CASES))
def test_selection_kernel_matches_reference(results, case):
    r = results[case]
    assert "error" not in r, r.get("error")
    assert r["dtype_ok"] and r["equal"], r


@pytest.mark.parametrize("kernel", list(SM90_KERNELS))
def test_kernels_compile_for_sm90(results, kernel):
    r = results[kernel]
    assert "error" not in r, r.get("error")
    assert r["compiled"]


@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_tiles_take_large_kv_blocks_only_with_hopper_shared_memory(head_dim):
    # 128-position blocks take 72 KB of shared memory at 128 dims: on a 100 KB-per-SM GPU that would
    # leave one resident program per SM, so those GPUs keep 64-position blocks.
    triton_kernels = pytest.importorskip("hf_sparsespec.attention.triton_kernels")
    decode = dict(num_tokens=64, num_rows=64, group=4, d_pad=head_dim)
    assert triton_kernels._tile_shape(**decode, big_blocks=True).block_n == 128
    assert triton_kernels._tile_shape(**decode, big_blocks=False).block_n == 64
    prefill = dict(num_tokens=4096, num_rows=2, group=4, d_pad=head_dim)
    assert triton_kernels._tile_shape(**prefill, big_blocks=True).block_n == 64
    # Unsplit draft-only steps past 64 dims keep 64-position blocks: more programs per SM.
    assert triton_kernels._tile_shape(**decode, big_blocks=True, draft_only=True).block_n == (128 if head_dim == 64 else 64)


def test_only_uniform_steps_whose_rows_fill_the_gpu_go_unsplit():
    import types

    import torch

    triton_kernels = pytest.importorskip("hf_sparsespec.attention.triton_kernels")
    cpu = torch.device("cpu")  # 4 programs stand for the SMs
    ctx = lambda **flags: types.SimpleNamespace(**{"draft_only": False, "verification_only": False, "verify_len": 9, **flags})  # noqa: E731
    fills = triton_kernels._rows_fill_gpu
    assert fills(ctx(draft_only=True), num_tokens=2, num_kv_heads=2, d_pad=64, device=cpu)
    assert not fills(ctx(draft_only=True), num_tokens=1, num_kv_heads=2, d_pad=64, device=cpu)
    assert not fills(ctx(), num_tokens=1024, num_kv_heads=8, d_pad=128, device=cpu)  # mixed steps keep their splits
    # Whole-row verification tiles: rows are tokens / verify_len, and only past 64 dims.
    assert fills(ctx(verification_only=True), num_tokens=18, num_kv_heads=8, d_pad=128, device=cpu)
    assert not fills(ctx(verification_only=True), num_tokens=9, num_kv_heads=8, d_pad=128, device=cpu)
    assert not fills(ctx(verification_only=True), num_tokens=576, num_kv_heads=8, d_pad=64, device=cpu)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_verification_only_steps_take_whole_row_tiles_past_64_dims(head_dim):
    triton_kernels = pytest.importorskip("hf_sparsespec.attention.triton_kernels")
    step = dict(num_tokens=576, num_rows=576, group=4, d_pad=head_dim, big_blocks=True)  # graph-padded rows
    plain, hinted = triton_kernels._tile_shape(**step), triton_kernels._tile_shape(**step, verification_only=True)
    if head_dim == 64:  # the bench model's heads gained nothing from them (session 8)
        assert hinted == plain
    else:
        assert (hinted.block_m, hinted.block_n, hinted.max_registers, hinted.finish_max_registers) == (64, 64, 128, 128)
        assert (plain.block_m, plain.max_registers) == (16, 0)  # decode tiles: capped in paged_attention


@pytest.mark.parametrize("group, verify_len, rows", [(3, 9, 32), (4, 9, 64), (3, 0, 64), (8, 9, 64), (1, 5, 16)])
def test_score_tile_holds_one_verification_row(group, verify_len, rows):
    # The score pass's query tile: a whole verification row (its queries times the group's heads) in
    # the fewest rows, at most 64; unknown verification lengths keep room for 16 queries.
    triton_kernels = pytest.importorskip("hf_sparsespec.attention.triton_kernels")
    tiles = triton_kernels._tile_shape(num_tokens=256, num_rows=128, group=group, d_pad=64, big_blocks=True,
                                       verify_len=verify_len)
    assert tiles.score_m == rows


if __name__ == "__main__":
    _child(sys.argv[1:])
