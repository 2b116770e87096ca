"""Triton kernels for the packed mixed batch: paged attention (full and sparse draft rows),
PillarAttn scores, and the KV write. ``reference.py`` holds the semantics; these must match it.

Everything here is CUDA-graph capturable and never reads a device value on the host: launch
grids and buffer sizes depend only on tensor shapes and on ``ctx.max_kv_len`` (a host int).

Work is cut into items (row, query tile, KV split, KV head), one program each. A query tile
holds ``QPT`` consecutive queries of one row times the ``G`` query heads of one KV group, so
each KV block is loaded once per group (see ``_tile_shape`` for the sizes). Draft rows see a
virtual KV sequence: their selected positions followed by the tail ``[tail_start, kv_len)``;
full rows see ``[0, kv_len)``. How many splits a row gets depends on the step's total work,
which only the device knows, so every program derives the item list from the row metadata
itself (one vectorised pass, no loop over items) and the grid is an upper bound from shapes;
programs past the real items return at once. Steps whose rows alone fill the GPU (all sparse drafts,
or a large lockstep verification) are not split at all (``_rows_fill_gpu``).

Two launches: the attention kernel writes final outputs of unsplit rows and per-split partials
of split rows; the finish kernel, over the same items, merges the partials and computes the
PillarAttn scores of verification rows, which need the final log-sum-exp and so a second look
at K; or, for block-granular scores (``ctx.score_block``), combines the per-block log-sum-exps
that the attention kernel stored during its pass, and reads no K.

Occupancy decides decode speed: Triton keeps one K/V block in flight per program, so HBM is
kept busy by resident programs, and registers bound those (an 8-warp 64-row tile used 229
registers per thread: one program per SM). Register and shared-memory counts for sm_90 come
from ``TRITON_DUMP_PTXAS_LOG=1`` on a compile, which needs no GPU (tests/test_triton_kernels.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .context import StepContext

__all__ = ["paged_attention", "write_kv"]

_LOG2E = 1.4426950408889634
# Items the split sizing aims at, per SM. A program keeps one KV block in flight, so its time
# is about proportional to its KV range, and the step lasts as long as its last item: several
# items per resident program even out the end, while each extra split adds partials to merge.
# Small heads (<= 64 dims) read little per block, so partials weigh more: half as many items.
_ITEMS_PER_SM = 8
_ITEMS_PER_SM_SMALL_HEADS = 4
# A split must read at least this many KV positions per query row (of all the row's tiles): the
# split's partial outputs (one fp32 row of D per query row, written and read back) then cost
# about an eighth of its KV reads at most.
_SPLIT_COST = 16
# Cap on the fp32 split partials allocated per call (the item target shrinks to fit).
_PARTIAL_BYTES = 64 << 20
# Registers per thread of 16-row (decode) attention tiles, at head dim 128. Uncapped they take 156
# (190 with block scores): 3 (2) programs per SM; at 96, 5 fit (shared memory allows no more) for
# a few bytes of spills. On the H200 (benchmarks/results/h200/session6) that made unified b128
# steps 10% faster (block scores 32%), draft steps 15%, plain decode 3%, and verification-only
# steps 5% (a cap of 128 did a little better there and worse elsewhere). Those figures are for
# 64-position KV blocks; with the 128-position ones (72 KB of shared memory at 128 dims: 3 programs
# per SM whatever the cap) the cap of 96 spills ~500 bytes, and the pair was measured faster all the
# same; whether a higher cap does better with them is for benchmarks/kernels_check.py --only verify-sweep.
_DECODE_MAX_REGISTERS = 96
# 16-row tiles that also sum block scores, at more than 64 dims: at 96 registers they spill enough
# to be 16-18% slower than at 128 (Qwen3-8B heads, H200, session 7); 64-dim heads keep 96 (4%
# faster there).
_BLOCK_SCORE_MAX_REGISTERS = 128
# Tiles holding a whole verification row (``_tile_shape``): the configuration measured in session 7.
_WHOLE_ROW_MAX_REGISTERS = 128
# The finish kernel's, with 16-row tiles: uncapped 255 (2 programs per SM), at 168 three fit for a
# few spills, which made verification and unified steps 7-19% faster (64-position blocks; with the
# 128-position ones its 84 KB of shared memory allow 2 per SM anyway).
_FINISH_MAX_REGISTERS = 168
# Heads of <= 64 dims (bench-code-lm's): at 168 the finish kernel used all 168, 3 programs per SM and 17%
# occupancy in a unified b128 x 16k step (ncu); capped at 128 that step's attention took 115 us per layer
# against 121 (96: 115.6; H200, session 11).
_FINISH_MAX_REGISTERS_SMALL_HEADS = 128
# After whole-row tiles (verification-only steps past 64 dims) a tighter cap pays more: a Qwen3-8B-shaped
# lockstep verification (64 rows x 9 tokens at 8k, per-position scores) took 1,223 us per layer at 128
# against 1,337 at 168 and 1,462 uncapped (H200, session 10, kernels_check --only score-pass).
_WHOLE_ROW_FINISH_MAX_REGISTERS = 128


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the CPU interpreter runs programs one after another; a few suffice


@functools.lru_cache(maxsize=None)
def _hopper_shared_memory(device: torch.device) -> bool:
    """Whether SMs hold ~228 KB of shared memory (sm_90, sm_100), where the 128-position decode blocks
    were measured; elsewhere (100 KB on sm_86/89/120) they would leave one resident program per SM.
    The CPU interpreter takes the Hopper shapes, so that tests cover what the H200 runs."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device)[0] in (9, 10)


def _pow2(x: int, at_least: int = 1) -> int:
    return max(at_least, triton.next_power_of_2(x))


@triton.jit
def _pick(vec, sel):
    """The entry of ``vec`` where ``sel`` holds (a register-only gather of one row's value)."""
    return tl.sum(tl.where(sel, vec, 0), axis=0)


@triton.jit
def _chunk(n, per_item, G: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_COST: tl.constexpr):
    """KV positions per split of a row of ``n`` queries: the step's ``per_item``, but never below
    what makes a split worth its partial outputs."""
    worth = tl.cdiv(SPLIT_COST * G * n, BLOCK_N) * BLOCK_N
    return tl.maximum(tl.maximum(per_item, worth), BLOCK_N)


@triton.jit
def _item(
    q_len_ptr, kv_len_ptr, is_draft_ptr, tail_ptr, sel_slot_ptr, sel_count_ptr,
    R, SEL_WIDTH, TARGET, FIXED_CHUNK,
    G: tl.constexpr, HKV: tl.constexpr, QPT: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
    SPLIT_COST: tl.constexpr, REVERSED: tl.constexpr,
):
    """This program's item, derived from the row metadata. Both kernels call it with the same
    arguments, so they agree on the items; ``REVERSED`` hands out the last items first.

    Splits are sized from the whole step's work: about the KV positions per item that give
    ``TARGET`` items per KV head, whether the step is one 16k-token row or a hundred short
    drafts (see ``_chunk``). ``FIXED_CHUNK > 0`` overrides it (tests). All tiles of a row share
    the row's split ranges. The tiles of one split are neighbours, so programs that start
    together read the same KV and share it through L2; the last tile comes first: under
    causality it is the longest, and long items started last would stretch the end of the step.

    Returns (item, row, head, tile, split, n, kv, tail, cnt, chunk, splits, part_start);
    ``item < 0`` for a program past the last item. The row's split partials start at partial
    item ``part_start``.
    """
    idx = tl.arange(0, R_PAD)
    ok = idx < R
    n = tl.load(q_len_ptr + idx, mask=ok, other=0).to(tl.int32)
    kv = tl.load(kv_len_ptr + idx, mask=ok, other=0).to(tl.int32)
    draft = tl.load(is_draft_ptr + idx, mask=ok, other=0).to(tl.int32) != 0
    tail = tl.load(tail_ptr + idx, mask=ok, other=0).to(tl.int32)
    slot = tl.load(sel_slot_ptr + idx, mask=ok, other=0)
    cnt = tl.load(sel_count_ptr + slot, mask=ok & draft, other=0).to(tl.int32)
    cnt = tl.minimum(tl.maximum(cnt, 0), SEL_WIDTH)
    # A full row is a draft row with nothing selected and its tail starting at 0: one code path.
    tail = tl.where(draft, tail, 0)
    seen = cnt + tl.maximum(kv - tail, 0)
    tiles = tl.cdiv(n, QPT)
    work = tl.sum(tiles.to(tl.int64) * seen, axis=0)
    per_item = tl.cdiv(tl.cdiv(work, TARGET).to(tl.int32), BLOCK_N) * BLOCK_N
    chunk = tl.where(FIXED_CHUNK > 0, FIXED_CHUNK, _chunk(n, per_item, G, BLOCK_N, SPLIT_COST))
    splits = tl.where(tiles > 0, tl.maximum(tl.cdiv(seen, chunk), 1), 0)
    units = tiles * splits
    ends = tl.cumsum(units, axis=0)
    split_units = tl.where(splits > 1, units, 0)
    split_ends = tl.cumsum(split_units, axis=0)

    item = tl.program_id(0)
    total = tl.sum(units, axis=0) * HKV
    if REVERSED:
        item = total - 1 - item
    item = tl.where(item < total, item, -1)
    unit = item // HKV
    row = tl.sum((ends <= unit).to(tl.int32), axis=0)
    sel = idx == row
    n = _pick(n, sel)
    kv = _pick(kv, sel)
    tail = _pick(tail, sel)
    cnt = _pick(cnt, sel)
    # Scalars again rather than picks: the same arithmetic costs less than a reduction.
    tiles = tl.cdiv(n, QPT)
    chunk = tl.where(FIXED_CHUNK > 0, FIXED_CHUNK, _chunk(n, per_item, G, BLOCK_N, SPLIT_COST))
    splits = tl.maximum(tl.cdiv(cnt + tl.maximum(kv - tail, 0), chunk), 1)
    u = unit - _pick(ends - units, sel)
    tiles = tl.maximum(tiles, 1)
    return (
        item, row, item % HKV, tiles - 1 - u % tiles, u // tiles, n, kv, tail, cnt, chunk, splits,
        _pick(split_ends - split_units, sel),
    )


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
def _attend(
    acc, m_i, l_i, q, qpos, start, end, k_base, v_base, stride_ks, stride_vs, bt_row, sel_row, cnt, tail, qk_scale,
    blse_rows, blse_ok,
    D: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    SELECTED: tl.constexpr, MASKED: tl.constexpr, SCORE_BLOCK: tl.constexpr, SCORE_COLS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PREFETCH: tl.constexpr,
):
    """Online softmax over virtual KV indices [start, end): selected positions or the tail.
    Unmasked calls get whole blocks of the tail that every query of the tile sees, so they skip
    the bounds and causal masks.

    With ``SCORE_BLOCK > 0`` (full rows only, where index = position), query rows where
    ``blse_ok`` holds also store, per aligned block of SCORE_BLOCK positions, the base-2
    log-sum-exp of their logits at ``blse_rows + block``: the block's attention mass once the
    row's final log-sum-exp is known, without a second read of K."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    if SELECTED and PREFETCH:
        # A selected block's K/V addresses are two dependent loads away (its positions, then their
        # pages). Loaded a block ahead, that chain's latency overlaps the current block's K/V loads.
        next_ok = start + offs_n < end
        next_pos = tl.load(sel_row + start + offs_n, mask=next_ok, other=0)
        next_page = tl.load(bt_row + next_pos // PAGE, mask=next_ok, other=0)
    for blk in range(start, end, BLOCK_N):
        j = blk + offs_n
        if MASKED:
            j_ok = j < end
            if SELECTED and PREFETCH:
                pos = next_pos
                page = next_page
            elif SELECTED:
                pos = tl.load(sel_row + j, mask=j_ok, other=0)
                page = tl.load(bt_row + pos // PAGE, mask=j_ok, other=0)
            else:
                pos = tail + j - cnt
                page = tl.load(bt_row + pos // PAGE, mask=j_ok, other=0)
            kv_mask = j_ok[:, None] & d_ok[None, :]
        else:
            pos = tail + j - cnt
            page = tl.load(bt_row + pos // PAGE)
            kv_mask = d_ok[None, :]
        kv_slot = page.to(tl.int64) * PAGE + pos % PAGE
        # Masked lanes read as zero so stale or NaN pool memory never reaches the dots.
        k = tl.load(k_base + kv_slot[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + kv_slot[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        if SELECTED and PREFETCH:
            next_ok = j + BLOCK_N < end
            next_pos = tl.load(sel_row + j + BLOCK_N, mask=next_ok, other=0)
            next_page = tl.load(bt_row + next_pos // PAGE, mask=next_ok, other=0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            s = tl.where(j_ok[None, :] & (pos[None, :] <= qpos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A row that has seen nothing yet keeps m = -inf; subtract 0 instead to avoid inf - inf.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_ref = m_new
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        if SCORE_BLOCK > 0:
            # Block sums as a product with a 0/1 matrix: on tensor cores, from the same rounded p as
            # the output's. With a reshape-and-sum a verification step's attention took 2.2x as long
            # as without scores, with the product 1.4x (H200, session 7). SCORE_COLS pads to a dot's 16.
            cols = tl.arange(0, SCORE_COLS)
            ones = (offs_n[:, None] // SCORE_BLOCK == cols[None, :]).to(v.dtype)
            part = tl.dot(p.to(v.dtype), ones, input_precision=DOT_PRECISION)
            b = blk // SCORE_BLOCK + cols
            tl.store(blse_rows[:, None] + b[None, :], m_ref[:, None] + tl.log2(part),
                     mask=blse_ok[:, None] & ((cols < BLOCK_N // SCORE_BLOCK) & (b * SCORE_BLOCK < end))[None, :])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, part_o_ptr, part_lse_ptr, blse_ptr,
    q_start_ptr, q_len_ptr, kv_len_ptr, is_draft_ptr, tail_ptr, sel_slot_ptr, sel_count_ptr, score_row_ptr,
    bt_ptr, sel_ptr,
    R, SEL_WIDTH, TARGET, FIXED_CHUNK, NUM_SCORE_BLOCKS, qk_scale,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ot, stride_oh,
    stride_bt, stride_sel_s, stride_sel_h,
    G: tl.constexpr, HKV: tl.constexpr, HQ: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, QPT: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, SPLIT_COST: tl.constexpr,
    WRITE_LSE: tl.constexpr, SCORE_BLOCK: tl.constexpr, SCORE_COLS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    item, row, h, tile, split, n, kv, tail, cnt, chunk, splits, part_start = _item(
        q_len_ptr, kv_len_ptr, is_draft_ptr, tail_ptr, sel_slot_ptr, sel_count_ptr,
        R, SEL_WIDTH, TARGET, FIXED_CHUNK, G, HKV, QPT, BLOCK_N, R_PAD, SPLIT_COST, False,
    )
    if item < 0:
        return
    q0 = tl.load(q_start_ptr + row).to(tl.int32)
    qi0 = tile * QPT
    row_ok, token, head, qpos = _tile_rows(qi0, n, q0, kv, h, G, QPT, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    ).to(k_ptr.dtype.element_ty)

    # Causality bounds what this tile can see: KV past its last query is never read.
    last_q = kv - n + tl.minimum(n, qi0 + QPT)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, cnt + tl.maximum(last_q - tail, 0))
    # Three stretches: selected positions (masked: nothing promises they precede the queries),
    # whole blocks of the tail that every query of the tile sees (unmasked), and the rest.
    sel_end = tl.minimum(hi, cnt)
    free_lo = tl.minimum(tl.maximum(lo, cnt), hi)
    free_end = tl.minimum(hi, cnt + tl.maximum(kv - n + qi0 + 1 - tail, 0))
    free_hi = free_lo + tl.maximum(free_end - free_lo, 0) // BLOCK_N * BLOCK_N

    sel_row = sel_ptr + tl.load(sel_slot_ptr + row) * stride_sel_s + h * stride_sel_h
    bt_row = bt_ptr + row.to(tl.int64) * stride_bt
    k_base = k_ptr + h * stride_kh
    v_base = v_ptr + h * stride_vh
    blse_rows = blse_ptr + (token * HQ + head) * NUM_SCORE_BLOCKS
    # A vector of the row's flag, not the scalar: Triton 3.9's interpreter rejects a store mask
    # made of a bool vector and a bool scalar.
    blse_ok = row_ok & (tl.full([BLOCK_M], 0, tl.int64) + tl.load(score_row_ptr + row) >= 0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, qpos, lo, sel_end, k_base, v_base, stride_ks, stride_vs, bt_row, sel_row,
                            cnt, tail, qk_scale, blse_rows, blse_ok, D, D_PAD, PAGE, BLOCK_N, True, True, 0, SCORE_COLS,
                            DOT_PRECISION, PREFETCH)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, qpos, free_lo, free_hi, k_base, v_base, stride_ks, stride_vs, bt_row, sel_row,
                            cnt, tail, qk_scale, blse_rows, blse_ok, D, D_PAD, PAGE, BLOCK_N, False, False, SCORE_BLOCK,
                            SCORE_COLS, DOT_PRECISION, PREFETCH)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, qpos, free_hi, hi, k_base, v_base, stride_ks, stride_vs, bt_row, sel_row,
                            cnt, tail, qk_scale, blse_rows, blse_ok, D, D_PAD, PAGE, BLOCK_N, False, True, SCORE_BLOCK,
                            SCORE_COLS, DOT_PRECISION, PREFETCH)

    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    lse = m_i + tl.log2(l_i)  # base-2, in units of qk_scale; -inf where nothing was visible
    o_mask = row_ok[:, None] & d_ok[None, :]
    if splits == 1:
        tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=o_mask)
        if WRITE_LSE:
            if tl.load(score_row_ptr + row) >= 0:
                tl.store(lse_ptr + token * HQ + head, lse, mask=row_ok)
    else:
        part = ((part_start + tile * splits + split) * HKV + h).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(part_o_ptr + part[:, None] * D_PAD + offs_d[None, :], o, mask=o_mask)
        tl.store(part_lse_ptr + part, lse, mask=row_ok)


@triton.jit
def _final_lse(lse_ptr, part_lse_ptr, token, head, row_ok, part_rows, splits,
               HQ: tl.constexpr, HKV: tl.constexpr, BLOCK_M: tl.constexpr, GROUP: tl.constexpr):
    """Log-sum-exp over the whole row of some queries: stored as is for unsplit rows, combined
    from the split partials (split s of query row i at ``part_rows[i] + s * HKV * BLOCK_M``)
    otherwise."""
    # No early return on a runtime condition: Triton 3.6 fails to lower one here
    # ("failed to legalize unresolved materialization"), so both cases are computed and selected.
    # Unwritten (but allocated) for split rows; discarded below.
    direct = tl.load(lse_ptr + token * HQ + head, mask=row_ok, other=0.0)
    offs_s = tl.arange(0, GROUP)
    m = tl.full(row_ok.shape, float("-inf"), tl.float32)
    total = tl.zeros(row_ok.shape, tl.float32)
    # GROUP splits per step: their loads are in flight together rather than one after another.
    for s0 in range(0, tl.where(splits == 1, 0, splits), GROUP):
        s = s0 + offs_s
        x = tl.load(part_lse_ptr + part_rows[None, :] + (s * HKV * BLOCK_M)[:, None],
                    mask=(s < splits)[:, None] & row_ok[None, :], other=float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        total = total * tl.exp2(m - m_ref) + tl.sum(tl.exp2(x - m_ref[None, :]), axis=0)
        m = m_new
    merged = tl.where(m == float("-inf"), 0.0, m) + tl.log2(total)
    return tl.where(splits == 1, direct, merged)


@triton.jit
def _finish_kernel(
    q_ptr, k_ptr, out_ptr, lse_ptr, part_o_ptr, part_lse_ptr, scores_ptr, blse_ptr,
    q_start_ptr, q_len_ptr, kv_len_ptr, is_draft_ptr, tail_ptr, sel_slot_ptr, sel_count_ptr, score_row_ptr,
    bt_ptr,
    R, SEL_WIDTH, TARGET, FIXED_CHUNK, SCORE_WIDTH, NUM_SCORE_BLOCKS, qk_scale,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_ot, stride_oh, stride_bt, stride_sc_v, stride_sc_h,
    G: tl.constexpr, HKV: tl.constexpr, HQ: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, QPT: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, SPLIT_COST: tl.constexpr,
    MERGE_GROUP: tl.constexpr, SCORE_M: tl.constexpr, SCORE_Q: tl.constexpr, WRITE_SCORES: tl.constexpr,
    SCORE_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Over the attention kernel's items: the first split of each split tile merges the tile's
    partials into the output; the items of a scored row (a full row) write the PillarAttn scores
    of their split's KV range, the row's tiles taking every ``tiles``-th block each so that the
    pass runs on all of the row's programs (on the first tile alone, a 16k row's blocks ran one
    after another on a few programs: the pass cost more than the attention it follows). Scores
    take tiles of SCORE_Q queries, a whole verification row at once, so each K block is read
    once for all of the row's queries."""
    # Items in reverse: the first ones here are those the attention kernel ran last, whose K is
    # the likeliest still in L2 for the score pass.
    item, row, h, tile, split, n, kv, tail, cnt, chunk, splits, part_start = _item(
        q_len_ptr, kv_len_ptr, is_draft_ptr, tail_ptr, sel_slot_ptr, sel_count_ptr,
        R, SEL_WIDTH, TARGET, FIXED_CHUNK, G, HKV, QPT, BLOCK_N, R_PAD, SPLIT_COST, True,
    )
    if item < 0:
        return
    q0 = tl.load(q_start_ptr + row).to(tl.int32)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_s = tl.arange(0, MERGE_GROUP)
    d_ok = offs_d < D
    if (splits > 1) & (split == 0):
        row_ok, token, head, qpos = _tile_rows(tile * QPT, n, q0, kv, h, G, QPT, BLOCK_M)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        # MERGE_GROUP partials per step, loaded together: a 30-split row merges in a few round trips.
        for s0 in range(0, splits, MERGE_GROUP):
            s = s0 + offs_s
            s_ok = s < splits
            rows = ((part_start + tile * splits + s) * HKV + h).to(tl.int64)[:, None] * BLOCK_M + offs_m[None, :]
            ok = s_ok[:, None] & row_ok[None, :]
            x = tl.load(part_lse_ptr + rows, mask=ok, other=float("-inf"))
            o = tl.load(part_o_ptr + rows[:, :, None] * D_PAD + offs_d[None, None, :],
                        mask=ok[:, :, None] & d_ok[None, None, :], other=0.0)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_ref)
            w = tl.exp2(x - m_ref[None, :])
            total = total * alpha + tl.sum(w, axis=0)
            acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, axis=0)
            m = m_new
        o = acc / tl.where(total == 0.0, 1.0, total)[:, None]
        tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    if WRITE_SCORES:
        target = tl.load(score_row_ptr + row)
        if target >= 0:
            lo = split * chunk
            hi = tl.minimum(lo + chunk, kv)
            out_row = scores_ptr + target * stride_sc_v + h * stride_sc_h
            bt_row = bt_ptr + row.to(tl.int64) * stride_bt
            k_base = k_ptr + h * stride_kh
            offs_n = tl.arange(0, BLOCK_N)
            inv_count = 1.0 / (G * n).to(tl.float32)
            tiles = tl.cdiv(n, QPT)
            # This tile's share: blocks tile, tile + tiles, ... of the split.
            num_blocks = tl.cdiv(tl.maximum(tl.cdiv(hi - lo, BLOCK_N) - tile, 0), tiles)
            for t in range(0, tl.cdiv(n, SCORE_Q)):
                row_ok, token, head, qpos = _tile_rows(t * SCORE_Q, n, q0, kv, h, G, SCORE_Q, SCORE_M)
                if SCORE_BLOCK == 0:
                    q = tl.load(
                        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
                    ).to(k_ptr.dtype.element_ty)
                # Where the attention kernel's tiles left each query's split partials.
                qi = t * SCORE_Q + tl.arange(0, SCORE_M) // G
                attn_tile = qi // QPT
                part_rows = ((part_start + attn_tile * splits) * HKV + h).to(tl.int64) * BLOCK_M + (qi - attn_tile * QPT) * G + head % G
                lse = _final_lse(lse_ptr, part_lse_ptr, token, head, row_ok, part_rows, splits, HQ, HKV, BLOCK_M, 16)
                # Backwards: the blocks the attention kernel read last are the likeliest still in L2.
                for b in range(0, num_blocks):
                    first = lo + (tile + (num_blocks - 1 - b) * tiles) * BLOCK_N
                    pos = first + offs_n
                    pos_ok = pos < hi
                    if SCORE_BLOCK > 0:
                        # Each position gets an equal share of its block's mass, from the attention
                        # kernel's block log-sum-exps: n x G values per block instead of K.
                        blocks = first // SCORE_BLOCK + tl.arange(0, BLOCK_N // SCORE_BLOCK)
                        start = blocks * SCORE_BLOCK
                        visible = row_ok[:, None] & (start < hi)[None, :] & (start[None, :] <= qpos[:, None])
                        x = tl.load(blse_ptr + ((token * HQ + head) * NUM_SCORE_BLOCKS)[:, None] + blocks[None, :],
                                    mask=visible, other=float("-inf"))
                        mass = tl.sum(tl.where(visible, tl.exp2(x - lse[:, None]), 0.0), axis=0) * (inv_count / SCORE_BLOCK)
                        p = tl.reshape(tl.broadcast_to(mass[:, None], (BLOCK_N // SCORE_BLOCK, SCORE_BLOCK)), (BLOCK_N,))
                    else:
                        page = tl.load(bt_row + pos // PAGE, mask=pos_ok, other=0)
                        kv_slot = page.to(tl.int64) * PAGE + pos % PAGE
                        k = tl.load(k_base + kv_slot[:, None] * stride_ks + offs_d[None, :],
                                    mask=pos_ok[:, None] & d_ok[None, :], other=0.0)
                        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
                        visible = row_ok[:, None] & pos_ok[None, :] & (pos[None, :] <= qpos[:, None])
                        p = tl.sum(tl.where(visible, tl.exp2(s - lse[:, None]), 0.0), axis=0) * inv_count
                    keep = pos_ok & (pos < SCORE_WIDTH)
                    # Later query tiles add to what the earlier ones stored.
                    p += tl.load(out_row + pos, mask=keep & (t > 0), other=0.0)
                    tl.store(out_row + pos, p, mask=keep)
                tl.debug_barrier()  # the next tile's loads must see every thread's stores


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


@dataclass(frozen=True)
class _Tiles:
    block_m: int  # attention query-tile rows (queries x group heads)
    block_n: int  # KV positions per block
    score_m: int  # score-pass query-tile rows
    items_per_sm: int  # what the split sizing aims at
    max_registers: int  # per thread of the attention kernel, on CUDA, if not decode tiles (0: uncapped)
    finish_max_registers: int = 0  # the same for the finish kernel


def _tile_shape(num_tokens: int, num_rows: int, group: int, d_pad: int, big_blocks: bool,
                verification_only: bool = False, verify_len: int = 0, draft_only: bool = False) -> _Tiles:
    """Tile shapes from shapes alone.

    Prefill-like steps (many tokens per row) take 128-row query tiles: tensor-core sized, and
    each KV block is reused by as many queries as fit. Decode steps (graph buckets have one row
    per token) are memory bound, and what keeps HBM busy is loads in flight, i.e. resident
    programs: 16-row tiles keep registers and shared memory small enough for several per SM.
    A verification row spans a few such tiles; they run side by side and share its KV in L2.
    The score pass, in contrast, reads K for every query of a row at once. With heads of <= 64
    dims, a decode program's 64-position block is too little work per loop iteration: 128-position
    blocks and fewer splits made the bench-code-lm heads' decode, draft and mixed steps 13-32%
    faster on the H200 (benchmarks/results/h200/session6). At 128 dims, 128-position blocks made
    verification steps 14% and mixed steps 8% faster, decode and draft steps no slower; fewer
    splits there would slow plain decode by 9%. They take 72 KB of shared memory at 128 dims, so
    only GPUs with Hopper-sized shared memory get them (``big_blocks``).

    A step of nothing but verifications (lockstep rounds, ``verification_only``) with heads of more
    than 64 dims takes 64-row tiles over 64-position blocks, capped at 128 registers: a Qwen3-8B
    verification row (9 queries x 4 heads) then reads its KV once, in one program, and a batch-32 x
    8k verification took 569 us per layer with block scores against 739 for 16-row tiles (442 against
    539 without scores; per-position scores 772 against 798). The bench model's 64-dim heads gained
    nothing (session 8), and mixed steps keep 16-row tiles for their drafts (session 5).

    The score pass holds a whole verification row in one query tile (its queries times the group's
    heads), so each K block is read once for all of them; sized from ``verify_len`` when known, the
    tile wastes no rows on queries that do not exist: bench-code-lm's 9 x 3 rows in 32 rather than 64
    made a unified 128 x 16k step's attention 13% faster (139 -> 121 us per layer, H200, session 10).
    """
    block_n = 64 if d_pad <= 128 else 32
    items_per_sm = _ITEMS_PER_SM
    small = _pow2(group, 16)
    score_m = max(min(64, _pow2(group * (verify_len or 16))), small)
    if verification_only and 64 < d_pad <= 128:
        return _Tiles(max(64, small), 64, score_m, items_per_sm, _WHOLE_ROW_MAX_REGISTERS, _WHOLE_ROW_FINISH_MAX_REGISTERS)
    if num_tokens > 2 * num_rows:
        block_m = 128 if d_pad <= 128 else 64
    else:
        block_m = 16
        # Not for steps of sparse drafts past 64 dims: run unsplit (``_rows_fill_gpu``), their programs
        # are as many as the GPU holds, and at 72 KB of shared memory only 3 fit per SM.
        if d_pad <= 128 and big_blocks and not (draft_only and d_pad > 64):
            block_n = 128
        if d_pad <= 64:
            items_per_sm = _ITEMS_PER_SM_SMALL_HEADS
    return _Tiles(max(block_m, small), block_n, score_m, items_per_sm, 0)


def _rows_fill_gpu(ctx: StepContext, num_tokens: int, num_kv_heads: int, d_pad: int, device: torch.device) -> bool:
    """Whether a step's rows, one program per (row, KV head) each, fill the GPU by themselves, so
    that splitting them only adds partials and their merge.

    Sparse drafts read a few hundred positions each: cut by the work-based sizing into items of two
    128-position blocks, a Qwen3-8B-shape draft step (64 rows x 8k) took 107 us of attention per
    layer, unsplit 74-76 (the finish kernel's merge launch then skipped altogether), and 62 over the
    64-position blocks ``_tile_shape`` gives such steps; bench-code-lm heads at 128 x 16k 49 -> 40
    (H200, session 11). Whole-row verification tiles (lockstep rounds,
    heads of 64-128 dims) at 64 rows x 8k, 8 KV heads: 1,217 -> 1,135 us per layer with scores.
    Graph buckets pad rows to one per token, so the count of real rows comes from the tokens.
    """
    programs = _num_sms(device)
    if ctx.draft_only:
        return num_tokens * num_kv_heads >= programs
    if ctx.verification_only and 64 < d_pad <= 128 and ctx.verify_len:
        # Measured at 512 items on 132 SMs; smaller batches keep their splits.
        return num_tokens // ctx.verify_len * num_kv_heads >= 3 * programs
    return False


# A split size no row reaches: every row one item per KV head.
_UNSPLIT = 1 << 30
# Heads up to this size look selected positions up a block ahead (``_attend``): draft-only steps of
# bench-code-lm heads at 128 x 16k took 35.6 us of attention per layer with it against 39.8, while
# Qwen3-8B heads (64 x 8k) took 81.0 against 74.3 (H200, session 11); mixed steps did not move.
_PREFETCH_MAX_DIM = 64


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
    target_items: int | None = None,
    split_tokens: int | None = None,
    num_stages: int | None = None,
    num_warps: int | None = None,
    max_registers: int | None = None,
    finish_max_registers: int | None = None,
    score_m: int | None = None,
    finish_warps: int | None = None,
    finish_stages: int | None = None,
    index_prefetch: bool | None = None,
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
        block_m, block_n, target_items, split_tokens, num_stages, num_warps, max_registers,
            finish_max_registers, score_m, finish_warps, finish_stages, index_prefetch: tuning overrides
            for benchmarks and tests (query-tile rows, KV block, items the split sizing aims at, a fixed
            number of KV positions per split, the attention kernel's pipeline stages, warps and
            registers per thread, and the finish kernel's registers per thread, score-pass tile rows,
            warps and pipeline stages, and whether selected positions are looked up a block ahead (by
            default for heads of up to 64 dims); register caps apply on CUDA only, 0 lifts the default one);
            by default chosen from the shapes and, for the split size, from the step's work on the
            device.
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
    tiles = _tile_shape(num_tokens, num_rows, group, d_pad, _hopper_shared_memory(query.device), ctx.verification_only,
                        verify_len=ctx.verify_len, draft_only=ctx.draft_only)
    block_m = max(block_m or tiles.block_m, _pow2(group, 16))
    block_n = block_n or tiles.block_n
    qpt = block_m // group
    # A 64 x D fp32 accumulator over 4 warps spills at D=128.
    warps = num_warps or (8 if block_m * d_pad >= 64 * 128 else 4)
    selection = _last_dim_contiguous(ctx.selection[:, layer])  # [S, H, K]
    sel_width = selection.shape[-1]

    # Upper bounds on the items (per KV head) and on the split items among them. A row of n
    # tokens has ceil(n / qpt) tiles, so all rows have at most max_tiles.
    max_tiles = min(num_tokens, num_tokens // qpt + num_rows)
    part_bytes = block_m * (d_pad + 1) * 4
    if split_tokens is None and _rows_fill_gpu(ctx, num_tokens, num_kv_heads, d_pad, query.device):
        split_tokens = _UNSPLIT
    if split_tokens:
        per_row = triton.cdiv(ctx.max_kv_len + sel_width, split_tokens)
        target, max_units, max_split_units = 1, max_tiles * per_row, max_tiles * per_row
    else:
        items = target_items or tiles.items_per_sm * _num_sms(query.device)
        target = max(1, min(items, _PARTIAL_BYTES // (2 * part_bytes)) // num_kv_heads)
        # Units past the tiles come from splits, each covering >= work / target positions; a split
        # row's splits number at most twice its work / chunk.
        max_units, max_split_units = max_tiles + target, 2 * target
    may_split = (split_tokens or block_n) < ctx.max_kv_len + sel_width
    write_scores = ctx.scores is not None and not ctx.draft_only  # drafts write none: no launch for them
    grid = (num_kv_heads * max_units,)

    dot_precision = "ieee" if query.dtype == torch.float32 else "tf32"
    qk_scale = scale * _LOG2E
    f32 = dict(dtype=torch.float32, device=query.device)
    lse = torch.empty(num_tokens, num_q_heads, **f32) if write_scores else out
    score_block = ctx.score_block if write_scores and ctx.score_block > 1 else 0  # 0: per-position score pass
    if score_block and (block_n % score_block or (split_tokens or 0) % score_block):
        raise ValueError(f"score blocks of {score_block} positions must divide the KV block ({block_n}) and any split_tokens")
    num_score_blocks = triton.cdiv(ctx.max_kv_len, score_block) if score_block else 0
    # Block log-sum-exps of every query row (only scored rows' are written): [T, Hq, blocks].
    blse = torch.empty(num_tokens * num_q_heads * num_score_blocks, **f32) if score_block else lse
    if may_split:
        part_o = torch.empty(num_kv_heads * max_split_units * block_m, d_pad, **f32)
        part_lse = torch.empty(num_kv_heads * max_split_units * block_m, **f32)
    else:
        part_o = part_lse = lse  # never touched: every row has a single split
    rows = (
        _flat(ctx.q_start), _flat(ctx.q_len), _flat(ctx.kv_len), _flat(ctx.is_draft),
        _flat(ctx.tail_start), _flat(ctx.sel_slot), _flat(ctx.sel_count), _flat(ctx.score_row),
    )
    block_tables = _last_dim_contiguous(ctx.block_tables)
    plan = (num_rows, sel_width, target, split_tokens or 0)
    shared = dict(G=group, HKV=num_kv_heads, HQ=num_q_heads, D=head_dim, D_PAD=d_pad, PAGE=ctx.cache.page_size,
                  BLOCK_M=block_m, QPT=qpt, BLOCK_N=block_n, R_PAD=_pow2(num_rows, 16), SPLIT_COST=_SPLIT_COST,
                  DOT_PRECISION=dot_precision)

    decode_tiles = block_m == 16  # the caps were measured on these; prefill tiles keep their registers
    if max_registers is None:
        if decode_tiles:
            max_registers = _BLOCK_SCORE_MAX_REGISTERS if score_block and d_pad > 64 else _DECODE_MAX_REGISTERS
        else:
            max_registers = tiles.max_registers if block_m == tiles.block_m else 0
    if finish_max_registers is None:
        if decode_tiles:
            finish_max_registers = _FINISH_MAX_REGISTERS_SMALL_HEADS if d_pad <= 64 else _FINISH_MAX_REGISTERS
        else:
            finish_max_registers = tiles.finish_max_registers if block_m == tiles.block_m else 0
    on_gpu = query.device.type == "cuda"  # the interpreter takes no register cap
    _attention_kernel[grid](
        q, k_pool, v_pool, out, lse, part_o, part_lse, blse, *rows, block_tables, selection,
        *plan, num_score_blocks, qk_scale,
        q.stride(1), q.stride(0), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        out.stride(1), out.stride(2), block_tables.stride(0), selection.stride(0), selection.stride(1),
        **shared, WRITE_LSE=write_scores, SCORE_BLOCK=score_block,
        PREFETCH=d_pad <= _PREFETCH_MAX_DIM if index_prefetch is None else index_prefetch,
        SCORE_COLS=max(16, block_n // score_block) if score_block else 16, num_warps=warps, num_stages=num_stages or 2,
        # Fewer registers, more resident programs (benchmarks/kernel_registers.py); ptxas spills past the cap.
        **({"maxnreg": max_registers} if max_registers and on_gpu else {}),
    )
    if may_split or write_scores:
        scores = ctx.scores[:, layer] if write_scores else out  # [V, H, width]
        # Partials merged per step: as many as keep the loaded tiles near 64 fp32 values per thread.
        merge_group = max(1, min(8, 64 * 32 * 4 // (block_m * d_pad)))
        score_m = max(score_m or tiles.score_m, _pow2(group, 16))
        _finish_kernel[grid](
            q, k_pool, out, lse, part_o, part_lse, scores, blse, *rows, block_tables,
            *plan, scores.shape[-1], num_score_blocks, qk_scale,
            q.stride(1), q.stride(0), k_pool.stride(0), k_pool.stride(1), out.stride(1), out.stride(2),
            block_tables.stride(0), scores.stride(0), scores.stride(1),
            **shared, MERGE_GROUP=merge_group, SCORE_M=score_m, SCORE_Q=score_m // group,
            WRITE_SCORES=write_scores, SCORE_BLOCK=score_block, num_warps=finish_warps or 4, num_stages=finish_stages or 2,
            **({"maxnreg": finish_max_registers} if finish_max_registers and on_gpu else {}),
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
