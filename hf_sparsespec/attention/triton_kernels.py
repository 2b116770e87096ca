"""Triton kernels for the packed mixed batch: paged attention (full and sparse draft rows),
PillarAttn scores, and the KV write. ``reference.py`` holds the semantics; these must match it.

Everything here is CUDA-graph capturable and never reads a device value on the host: launch
grids and buffer sizes depend only on tensor shapes and on ``ctx.max_kv_len`` (a host int).
The kernels are persistent: each program walks a list of work items that it derives on the
device from the row metadata, so a graph captured for a padded bucket of rows spends no
programs on padding rows, and long rows are cut into equal KV chunks (split-KV, as in
flash-decoding) whose partial results a second kernel merges.

Work item of the attention kernel: (row, query tile, KV split, KV head). A query tile holds
``BLOCK_M // G`` consecutive queries of one row times the ``G`` query heads of one KV group,
so each KV block is loaded once per group. Draft rows see a virtual KV sequence: their
selected positions followed by the tail ``[tail_start, kv_len)``; full rows see ``[0, kv_len)``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .context import StepContext

__all__ = ["paged_attention", "write_kv"]

_LOG2E = 1.4426950408889634
# Programs per SM for the persistent kernels: enough resident loads to keep HBM busy.
_PROGRAMS_PER_SM = 4
# Work items per program the chunk size aims at: more evens out uneven items, fewer saves
# per-item overhead and (for attention) merging.
_ITEMS_PER_PROGRAM = 2
# Shortest KV chunk, in KV blocks: an item also pays for finding its row and storing its result.
_MIN_CHUNK_BLOCKS = 2
# Cap on the fp32 split-KV partial outputs allocated per call.
_PARTIAL_BYTES = 64 << 20


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the CPU interpreter runs programs one after another; a few suffice


def _pow2(x: int, at_least: int = 1) -> int:
    return max(at_least, triton.next_power_of_2(x))


@triton.jit
def _rows(
    q_start_ptr, q_len_ptr, kv_len_ptr, is_draft_ptr, tail_ptr, sel_slot_ptr, sel_count_ptr,
    R, SEL_WIDTH, FIXED_CHUNK, MAX_SPLITS, WORKERS,
    QPT: tl.constexpr, R_PAD: tl.constexpr, HKV: tl.constexpr, ITEMS_PER_PROGRAM: tl.constexpr, MIN_CHUNK: tl.constexpr,
):
    """Per-row vectors every program needs to find its work: loaded once, kept in registers.

    The split size follows the step's actual work (known only on the device): chunks are sized so
    the ``WORKERS`` programs get about ``_ITEMS_PER_PROGRAM`` items each, whether the step is one
    16k-token row or a hundred short drafts. ``FIXED_CHUNK > 0`` overrides it (tests, tuning).
    """
    idx = tl.arange(0, R_PAD)
    ok = idx < R
    q0 = tl.load(q_start_ptr + idx, mask=ok, other=0).to(tl.int32)
    n = tl.load(q_len_ptr + idx, mask=ok, other=0).to(tl.int32)
    kv = tl.load(kv_len_ptr + idx, mask=ok, other=0).to(tl.int32)
    draft = tl.load(is_draft_ptr + idx, mask=ok, other=0).to(tl.int32) != 0
    tail = tl.load(tail_ptr + idx, mask=ok, other=0).to(tl.int32)
    slot = tl.load(sel_slot_ptr + idx, mask=ok, other=0)
    cnt = tl.load(sel_count_ptr + slot, mask=ok & draft, other=0).to(tl.int32)
    cnt = tl.minimum(tl.maximum(cnt, 0), SEL_WIDTH)
    # A full row is a draft row with nothing selected and its tail starting at 0: one code path.
    tail = tl.where(draft, tail, 0)
    # Splits are sized by the row's whole KV length so all query tiles of a row agree on them.
    seen = cnt + tl.maximum(kv - tail, 0)
    tiles = tl.cdiv(n, QPT)
    work = tl.sum(tiles.to(tl.int64) * seen, axis=0) * HKV
    chunk = tl.maximum(tl.cdiv(work, WORKERS * ITEMS_PER_PROGRAM), MIN_CHUNK)
    chunk = tl.where(FIXED_CHUNK > 0, FIXED_CHUNK, chunk)
    splits = tl.minimum(tl.maximum(tl.cdiv(seen, chunk), 1), MAX_SPLITS).to(tl.int32)
    return idx, q0, n, kv, tail, slot, cnt, splits, tiles


@triton.jit
def _pick(vec, sel):
    """The entry of ``vec`` where ``sel`` holds (a register-only gather of one row's value)."""
    return tl.sum(tl.where(sel, vec, 0), axis=0)


@triton.jit
def _tile_rows(qi0, n, q0, kv, h, G: tl.constexpr, QPT: tl.constexpr, BLOCK_M: tl.constexpr):
    """Tile row m is query ``qi0 + m // G`` of the row under query head ``h * G + m % G``."""
    offs_m = tl.arange(0, BLOCK_M)
    qi = qi0 + offs_m // G
    row_ok = (offs_m < QPT * G) & (qi < n)
    token = (q0 + qi).to(tl.int64)
    head = h * G + offs_m % G
    qpos = kv - n + qi
    return row_ok, token, head, qpos


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, part_o_ptr, part_lse_ptr,
    q_start_ptr, q_len_ptr, kv_len_ptr, is_draft_ptr, tail_ptr, sel_slot_ptr, sel_count_ptr,
    bt_ptr, sel_ptr,
    R, SEL_WIDTH, FIXED_CHUNK, MAX_SPLITS, WORKERS, qk_scale,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ot, stride_oh,
    stride_bt, stride_sel_s, stride_sel_h,
    G: tl.constexpr, HKV: tl.constexpr, HQ: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, QPT: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
    ITEMS_PER_PROGRAM: tl.constexpr, MIN_CHUNK: tl.constexpr, WRITE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    idx, q0s, ns, kvs, tails, slots, cnts, splits, tiles = _rows(
        q_start_ptr, q_len_ptr, kv_len_ptr, is_draft_ptr, tail_ptr, sel_slot_ptr, sel_count_ptr,
        R, SEL_WIDTH, FIXED_CHUNK, MAX_SPLITS, WORKERS, QPT, R_PAD, HKV, ITEMS_PER_PROGRAM, MIN_CHUNK,
    )
    units = tiles * splits
    ends = tl.cumsum(units, axis=0)
    total = tl.sum(units, axis=0) * HKV
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    for item in range(tl.program_id(0), total, tl.num_programs(0)):
        unit = item // HKV
        h = item % HKV
        row = tl.sum((ends <= unit).to(tl.int32), axis=0)
        sel = idx == row
        q0 = _pick(q0s, sel)
        n = _pick(ns, sel)
        kv = _pick(kvs, sel)
        tail = _pick(tails, sel)
        cnt = _pick(cnts, sel)
        row_splits = _pick(splits, sel)
        row_tiles = _pick(tiles, sel)
        u = unit - (_pick(ends, sel) - _pick(units, sel))
        split = u // row_tiles
        qi0 = (u % row_tiles) * QPT
        row_ok, token, head, qpos = _tile_rows(qi0, n, q0, kv, h, G, QPT, BLOCK_M)

        # Causality bounds what this tile can see: KV past its last query is never read.
        limit = kv - n + tl.minimum(n, qi0 + QPT)
        seen = cnt + tl.maximum(limit - tail, 0)
        chunk = tl.cdiv(tl.cdiv(seen, row_splits), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, seen)

        q = tl.load(
            q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        ).to(k_ptr.dtype.element_ty)
        sel_row = sel_ptr + _pick(slots, sel) * stride_sel_s + h * stride_sel_h
        bt_row = bt_ptr + row.to(tl.int64) * stride_bt
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            j = start + offs_n
            j_ok = j < hi
            picked = tl.load(sel_row + j, mask=j_ok & (j < cnt), other=0)
            pos = tl.where(j < cnt, picked, tail + j - cnt)
            page = tl.load(bt_row + pos // PAGE, mask=j_ok, other=0)
            kv_slot = page.to(tl.int64) * PAGE + pos % PAGE
            kv_mask = j_ok[:, None] & d_ok[None, :]
            # Masked lanes read as zero so stale or NaN pool memory never reaches the dots.
            k = tl.load(k_ptr + kv_slot[:, None] * stride_ks + h * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + kv_slot[:, None] * stride_vs + h * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            visible = j_ok[None, :] & (pos[None, :] <= qpos[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A row that has seen nothing yet keeps m = -inf; subtract 0 instead to avoid inf - inf.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_ref)
            p = tl.exp2(s - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        lse = m_i + tl.log2(l_i)  # base-2, in units of qk_scale; -inf where nothing was visible
        o_mask = row_ok[:, None] & d_ok[None, :]
        if row_splits == 1:
            tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=o_mask)
            if WRITE_LSE:
                tl.store(lse_ptr + token * HQ + head, lse, mask=row_ok)
        else:
            part = (token * HQ + head) * MAX_SPLITS + split
            tl.store(part_o_ptr + part[:, None] * D_PAD + offs_d[None, :], o, mask=o_mask)
            tl.store(part_lse_ptr + part, lse, mask=row_ok)


@triton.jit
def _merge_kernel(
    out_ptr, lse_ptr, part_o_ptr, part_lse_ptr,
    q_start_ptr, q_len_ptr, kv_len_ptr, is_draft_ptr, tail_ptr, sel_slot_ptr, sel_count_ptr,
    R, SEL_WIDTH, FIXED_CHUNK, MAX_SPLITS, WORKERS, stride_ot, stride_oh,
    G: tl.constexpr, HKV: tl.constexpr, HQ: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, QPT: tl.constexpr, R_PAD: tl.constexpr,
    ITEMS_PER_PROGRAM: tl.constexpr, MIN_CHUNK: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    """Combine the split-KV partials of every tile whose row was split (others are final already)."""
    idx, q0s, ns, kvs, tails, slots, cnts, splits, tiles = _rows(
        q_start_ptr, q_len_ptr, kv_len_ptr, is_draft_ptr, tail_ptr, sel_slot_ptr, sel_count_ptr,
        R, SEL_WIDTH, FIXED_CHUNK, MAX_SPLITS, WORKERS, QPT, R_PAD, HKV, ITEMS_PER_PROGRAM, MIN_CHUNK,
    )
    units = tl.where(splits > 1, tiles, 0)
    ends = tl.cumsum(units, axis=0)
    total = tl.sum(units, axis=0) * HKV
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    for item in range(tl.program_id(0), total, tl.num_programs(0)):
        unit = item // HKV
        h = item % HKV
        row = tl.sum((ends <= unit).to(tl.int32), axis=0)
        sel = idx == row
        n = _pick(ns, sel)
        row_splits = _pick(splits, sel)
        qi0 = (unit - (_pick(ends, sel) - _pick(units, sel))) * QPT
        row_ok, token, head, qpos = _tile_rows(qi0, n, _pick(q0s, sel), _pick(kvs, sel), h, G, QPT, BLOCK_M)
        base = (token * HQ + head) * MAX_SPLITS
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for s in range(0, row_splits):
            m = tl.maximum(m, tl.load(part_lse_ptr + base + s, mask=row_ok, other=float("-inf")))
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        total_w = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        o_mask = row_ok[:, None] & d_ok[None, :]
        for s in range(0, row_splits):
            w = tl.exp2(tl.load(part_lse_ptr + base + s, mask=row_ok, other=float("-inf")) - m_ref)
            o = tl.load(part_o_ptr + (base + s)[:, None] * D_PAD + offs_d[None, :], mask=o_mask, other=0.0)
            total_w += w
            acc += w[:, None] * o
        o = acc / tl.where(total_w == 0.0, 1.0, total_w)[:, None]
        tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=o_mask)
        if WRITE_LSE:
            tl.store(lse_ptr + token * HQ + head, m_ref + tl.log2(total_w), mask=row_ok)


@triton.jit
def _score_kernel(
    q_ptr, k_ptr, lse_ptr, scores_ptr,
    q_start_ptr, q_len_ptr, kv_len_ptr, score_row_ptr, bt_ptr,
    R, SCORE_WIDTH, qk_scale,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_bt, stride_sc_v, stride_sc_h,
    G: tl.constexpr, HKV: tl.constexpr, HQ: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, QPT: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
    ITEMS_PER_PROGRAM: tl.constexpr, MIN_CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """PillarAttn scores of full rows: per KV position, the attention probability summed over the
    row's queries and the group's heads (recomputed from Q K^T and the final log-sum-exp), / (G n).

    Work item: (score row, chunk of KV positions, KV head), chunks sized so every program gets
    work; each K block is read once and every query tile of the row is applied to it.
    """
    idx = tl.arange(0, R_PAD)
    ok = idx < R
    q0s = tl.load(q_start_ptr + idx, mask=ok, other=0).to(tl.int32)
    ns = tl.load(q_len_ptr + idx, mask=ok, other=0).to(tl.int32)
    kvs = tl.load(kv_len_ptr + idx, mask=ok, other=0).to(tl.int32)
    targets = tl.load(score_row_ptr + idx, mask=ok, other=-1)
    wanted = (targets >= 0) & (ns > 0)
    work = tl.sum(tl.where(wanted, kvs, 0).to(tl.int64), axis=0) * HKV
    chunk = tl.maximum(tl.cdiv(work, tl.num_programs(0) * ITEMS_PER_PROGRAM), MIN_CHUNK)
    chunk = (tl.cdiv(chunk, BLOCK_N) * BLOCK_N).to(tl.int32)
    units = tl.where(wanted, tl.cdiv(kvs, chunk), 0)
    ends = tl.cumsum(units, axis=0)
    total = tl.sum(units, axis=0) * HKV
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    for item in range(tl.program_id(0), total, tl.num_programs(0)):
        unit = item // HKV
        h = item % HKV
        row = tl.sum((ends <= unit).to(tl.int32), axis=0)
        sel = idx == row
        n = _pick(ns, sel)
        kv = _pick(kvs, sel)
        q0 = _pick(q0s, sel)
        lo = (unit - (_pick(ends, sel) - _pick(units, sel))) * chunk
        hi = tl.minimum(lo + chunk, kv)
        out_row = scores_ptr + _pick(targets, sel) * stride_sc_v + h * stride_sc_h
        bt_row = bt_ptr + row.to(tl.int64) * stride_bt
        inv_count = 1.0 / (G * n).to(tl.float32)
        for start in range(lo, hi, BLOCK_N):
            pos = start + offs_n
            pos_ok = pos < hi
            page = tl.load(bt_row + pos // PAGE, mask=pos_ok, other=0)
            kv_slot = page.to(tl.int64) * PAGE + pos % PAGE
            k = tl.load(k_ptr + kv_slot[:, None] * stride_ks + h * stride_kh + offs_d[None, :],
                        mask=pos_ok[:, None] & d_ok[None, :], other=0.0)
            total_p = tl.zeros([BLOCK_N], tl.float32)
            for qi0 in range(0, n, QPT):
                row_ok, token, head, qpos = _tile_rows(qi0, n, q0, kv, h, G, QPT, BLOCK_M)
                q = tl.load(
                    q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0,
                ).to(k_ptr.dtype.element_ty)
                lse = tl.load(lse_ptr + token * HQ + head, mask=row_ok, other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
                visible = row_ok[:, None] & pos_ok[None, :] & (pos[None, :] <= qpos[:, None])
                total_p += tl.sum(tl.where(visible, tl.exp2(s - lse[:, None]), 0.0), axis=0)
            tl.store(out_row + pos, total_p * inv_count, mask=pos_ok & (pos < SCORE_WIDTH))


@triton.jit
def _write_kv_kernel(
    k_pool_ptr, v_pool_ptr, keys_ptr, values_ptr, slot_ptr,
    stride_pks, stride_pkh, stride_pvs, stride_pvh, stride_kh, stride_kt, stride_vh, stride_vt,
    H: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        offs_h = tl.arange(0, H_PAD)[:, None]
        offs_d = tl.arange(0, D_PAD)[None, :]
        mask = (offs_h < H) & (offs_d < D)
        k = tl.load(keys_ptr + offs_h * stride_kh + t * stride_kt + offs_d, mask=mask)
        v = tl.load(values_ptr + offs_h * stride_vh + t * stride_vt + offs_d, mask=mask)
        tl.store(k_pool_ptr + slot * stride_pks + offs_h * stride_pkh + offs_d, k.to(k_pool_ptr.dtype.element_ty), mask=mask)
        tl.store(v_pool_ptr + slot * stride_pvs + offs_h * stride_pvh + offs_d, v.to(v_pool_ptr.dtype.element_ty), mask=mask)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(0) == 1 else t.contiguous()


def _max_splits(max_kv_len: int, tokens: int, q_heads: int, d_pad: int, block_n: int, cap: int | None) -> int:
    """Most splits of one row: bounds the partial-output buffer, which is sized from shapes only."""
    by_memory = _PARTIAL_BYTES // (tokens * q_heads * (d_pad + 1) * 4)
    by_length = triton.cdiv(max_kv_len, _MIN_CHUNK_BLOCKS * block_n)
    return max(1, min(by_memory, by_length, cap if cap is not None else by_length))


def paged_attention(
    query: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    ctx: StepContext,
    layer: int,
    scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    max_splits: int | None = None,
    split_tokens: int | None = None,
    num_programs: int | None = None,
) -> torch.Tensor:
    """PillarAttn over the paged pool for a packed batch of full and draft rows; (1, T, Hq, D).

    Same semantics as ``reference.reference_attention``, including the PillarAttn scores that rows
    with ``score_row >= 0`` write into ``ctx.scores[:, layer]`` (those rows must be full rows, as
    verification rows are). Outputs of tokens outside every row are left unwritten.

    Args:
        query: (1, Hq, T, D); any strides with a contiguous last dimension.
        k_pool, v_pool: this layer's pools, [slots, Hkv, D], contiguous last dimension.
        ctx: the step's metadata; ``ctx.max_kv_len`` must bound every ``kv_len``.
        layer: index into ``ctx.selection`` and ``ctx.scores``.
        scale: softmax scale applied to Q K^T.
        block_m, block_n, max_splits, split_tokens, num_programs: tuning overrides for benchmarks
            and tests (query-tile rows, KV block, most splits per row, fixed KV positions per
            split, persistent programs); by default chosen from the shapes and, for the split
            size, from the step's work on the device.
    """
    _, num_q_heads, num_tokens, head_dim = query.shape
    num_rows = ctx.q_len.shape[0]
    num_kv_heads = k_pool.shape[1]
    group = num_q_heads // num_kv_heads
    out = torch.empty(1, num_tokens, num_q_heads, head_dim, dtype=query.dtype, device=query.device)
    if num_tokens == 0 or num_rows == 0:
        return out
    if k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1:
        raise ValueError("paged_attention needs pools with a contiguous last dimension")
    q = _last_dim_contiguous(query[0])  # (Hq, T, D)
    d_pad = _pow2(head_dim, 16)
    if block_m is None:
        # Decode-like steps (graph buckets have one row per token) waste less on small tiles.
        block_m = 16 if num_tokens <= 2 * num_rows else 64
    block_m = max(block_m, _pow2(group, 16))
    block_n = block_n or (64 if d_pad <= 128 else 32)
    max_splits = _max_splits(ctx.max_kv_len, num_tokens, num_q_heads, d_pad, block_n, max_splits)
    max_tiles = min(num_tokens, num_tokens // (block_m // group) + num_rows) * num_kv_heads
    programs = num_programs or _PROGRAMS_PER_SM * _num_sms(query.device)
    workers = min(programs, max_tiles * max_splits)
    r_pad = _pow2(num_rows, 16)
    dot_precision = "ieee" if query.dtype == torch.float32 else "tf32"
    qk_scale = scale * _LOG2E
    write_lse = ctx.scores is not None
    fixed_chunk = split_tokens or 0
    # 64-row tiles hold a 64 x D fp32 accumulator: 4 warps would spill at D=128.
    warps = 8 if block_m >= 64 else 4
    shared = dict(G=group, HKV=num_kv_heads, HQ=num_q_heads, D=head_dim, D_PAD=d_pad, BLOCK_M=block_m, QPT=block_m // group,
                  R_PAD=r_pad, ITEMS_PER_PROGRAM=_ITEMS_PER_PROGRAM, MIN_CHUNK=_MIN_CHUNK_BLOCKS * block_n)

    rows = (
        _flat(ctx.q_start), _flat(ctx.q_len), _flat(ctx.kv_len), _flat(ctx.is_draft),
        _flat(ctx.tail_start), _flat(ctx.sel_slot), _flat(ctx.sel_count),
    )
    block_tables = _last_dim_contiguous(ctx.block_tables)
    selection = _last_dim_contiguous(ctx.selection[:, layer])  # [S, H, K]
    sel_width = selection.shape[-1]
    lse = torch.empty(num_tokens, num_q_heads, dtype=torch.float32, device=query.device) if write_lse else out
    if max_splits > 1:
        part_o = torch.empty(num_tokens * num_q_heads * max_splits, d_pad, dtype=torch.float32, device=query.device)
        part_lse = torch.empty(num_tokens * num_q_heads * max_splits, dtype=torch.float32, device=query.device)
    else:
        part_o = part_lse = lse  # never touched: every row has a single split

    _attention_kernel[(workers,)](
        q, k_pool, v_pool, out, lse, part_o, part_lse,
        *rows, block_tables, selection,
        num_rows, sel_width, fixed_chunk, max_splits, workers, qk_scale,
        q.stride(1), q.stride(0), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        out.stride(1), out.stride(2), block_tables.stride(0), selection.stride(0), selection.stride(1),
        **shared, PAGE=ctx.cache.page_size, BLOCK_N=block_n, WRITE_LSE=write_lse, DOT_PRECISION=dot_precision,
        num_warps=warps, num_stages=2,
    )
    if max_splits > 1:
        _merge_kernel[(min(programs, max_tiles),)](
            out, lse, part_o, part_lse, *rows,
            num_rows, sel_width, fixed_chunk, max_splits, workers, out.stride(1), out.stride(2),
            **shared, WRITE_LSE=write_lse, num_warps=warps,
        )
    if write_lse:
        scores = ctx.scores[:, layer]  # [V, H, width]
        score_block_m = _pow2(group, 64)  # verification rows (k+1 queries x G heads) in one tile
        max_score_units = min(num_rows, scores.shape[0]) * triton.cdiv(ctx.max_kv_len, block_n) * num_kv_heads
        _score_kernel[(max(1, min(programs, max_score_units)),)](
            q, k_pool, lse, scores,
            rows[0], rows[1], rows[2], _flat(ctx.score_row), block_tables,
            num_rows, scores.shape[-1], qk_scale,
            q.stride(1), q.stride(0), k_pool.stride(0), k_pool.stride(1), block_tables.stride(0),
            scores.stride(0), scores.stride(1),
            **{**shared, "BLOCK_M": score_block_m, "QPT": score_block_m // group}, PAGE=ctx.cache.page_size,
            BLOCK_N=block_n, DOT_PRECISION=dot_precision, num_warps=8, num_stages=2,
        )
    return out


def write_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter ``keys``/``values`` ([H, T, D]) into pool slots ([slots, H, D]); slot -1 is skipped.

    One program per token; the pools' dtype is the storage dtype (inputs are cast).
    """
    num_heads, num_tokens, head_dim = keys.shape
    if num_tokens == 0:
        return
    if k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1:
        raise ValueError("write_kv needs pools with a contiguous last dimension (it writes in place)")
    keys, values = _last_dim_contiguous(keys), _last_dim_contiguous(values)
    _write_kv_kernel[(num_tokens,)](
        k_pool, v_pool, keys, values, _flat(slot_mapping),
        k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        H=num_heads, H_PAD=_pow2(num_heads), D=head_dim, D_PAD=_pow2(head_dim),
    )
