"""Selection as one Triton kernel: ``selection.select_tokens`` for the policies the engine runs.

On the GPU the PyTorch rule took ~15 launches per verification step (max-pool, a radix top-k over
every position, a sort of the chosen ones, masks): ~280 us of a 2 ms unified step at batch 128 x
16k on the H200 (benchmarks/results/h200/session7). Here one program per (verification, layer, KV
head) row computes each candidate's priority on the fly (pooled score, forced positions), finds
the ``count``-th largest by a radix select over order-preserving integer keys (stored on the first
of five passes), and writes the chosen positions in ascending order, which is the order a scan
meets them in, so nothing is sorted. Ties at the threshold go to lower positions, as in the
reference's stable sort. That step's selection now takes 154 us against the rule's 478-494
(session 8); what bounds it is a row's ~60 dependent chunk iterations on one program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["select_tokens_triton"]

# Positions per loop iteration and warps per program: 1,024-8,192 and 4-16 timed alike (session 8).
_CHUNK, _NUM_WARPS = 1024, 4


@triton.jit
def _keys(scores_row, pos, n, old_len, forced_from, SINKS: tl.constexpr, LOOKBACK: tl.constexpr,
          LOOKAHEAD: tl.constexpr, BY_POSITION: tl.constexpr):
    """Order-preserving uint32 keys of the priorities of positions ``pos`` (candidates: ``< old_len``)."""
    if BY_POSITION:
        p = pos.to(tl.float32)
    else:
        p = tl.load(scores_row + pos, mask=pos < n, other=float("-inf"))
        for d in tl.static_range(1, LOOKBACK + 1):
            q = pos - d
            p = tl.maximum(p, tl.load(scores_row + q, mask=(q >= 0) & (q < n), other=float("-inf")))
        for d in tl.static_range(1, LOOKAHEAD + 1):
            q = pos + d
            p = tl.maximum(p, tl.load(scores_row + q, mask=q < n, other=float("-inf")))
    p = tl.where((pos < SINKS) | (pos >= forced_from), float("inf"), p)
    bits = p.to(tl.int32, bitcast=True)
    # Negative floats order backwards as integers: flip them whole; positive ones get the top bit.
    key = tl.where(bits < 0, ~bits, bits ^ -2147483648)
    return key.to(tl.uint32, bitcast=True)


@triton.jit
def _digit(hist, bins, need):
    """The digit (bin) holding the ``need``-th largest key, and ``need`` less the keys above it."""
    at_or_above = tl.cumsum(hist, 0, reverse=True)
    digit = tl.max(tl.where(at_or_above >= need, bins, -1), 0)
    return digit, need - tl.sum(tl.where(bins > digit, hist, 0), 0)


@triton.jit
def _nibble_pass(prefix, need, keys_row, scores_row, n, old_len, forced_from, SHIFT: tl.constexpr,
                 FROM_SCORES: tl.constexpr, SINKS: tl.constexpr, LOOKBACK: tl.constexpr, LOOKAHEAD: tl.constexpr,
                 BY_POSITION: tl.constexpr, CHUNK: tl.constexpr):
    """A 4-bit digit of the threshold, counted by comparison rather than by ``tl.histogram``: the top
    bits of a row's keys (sign and exponent) take a handful of values, and a histogram's atomic adds
    on so few bins serialise. ``FROM_SCORES`` computes the keys (and stores them) instead of loading them."""
    offs = tl.arange(0, CHUNK)
    bins = tl.arange(0, 16)
    hist = tl.zeros([16], tl.int32)
    for start in range(0, old_len, CHUNK):
        pos = start + offs
        ok = pos < old_len
        if FROM_SCORES:
            key = _keys(scores_row, pos, n, old_len, forced_from, SINKS, LOOKBACK, LOOKAHEAD, BY_POSITION)
            tl.store(keys_row + pos, key.to(tl.int32, bitcast=True), mask=ok)
        else:
            key = tl.load(keys_row + pos, mask=ok, other=0).to(tl.uint32, bitcast=True)
            ok = ok & ((key >> (SHIFT + 4)) == (prefix >> (SHIFT + 4)))
        digit = ((key >> SHIFT) & 15).to(tl.int32)
        hist += tl.sum(((digit[:, None] == bins[None, :]) & ok[:, None]).to(tl.int32), 0)
    digit, need = _digit(hist, bins, need)
    return prefix | (digit.to(tl.uint32) << SHIFT), need


@triton.jit
def _byte_pass(prefix, need, keys_row, old_len, SHIFT: tl.constexpr, CHUNK: tl.constexpr):
    """An 8-bit digit of the threshold from the stored keys; below the exponent they spread out."""
    offs = tl.arange(0, CHUNK)
    bins = tl.arange(0, 256)
    hist = tl.zeros([256], tl.int32)
    for start in range(0, old_len, CHUNK):
        pos = start + offs
        key = tl.load(keys_row + pos, mask=pos < old_len, other=0).to(tl.uint32, bitcast=True)
        ok = (pos < old_len) & ((key >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
        hist += tl.histogram(((key >> SHIFT) & 255).to(tl.int32), 256, mask=ok)
    digit, need = _digit(hist, bins, need)
    return prefix | (digit.to(tl.uint32) << SHIFT), need


@triton.jit
def _select_kernel(
    scores_ptr, keys_ptr, old_len_ptr, count_ptr, out_ptr, recent_fraction,
    N, WIDTH, ROWS_PER_V, stride_row, stride_out,
    SINKS: tl.constexpr, LOOKBACK: tl.constexpr, LOOKAHEAD: tl.constexpr, BY_POSITION: tl.constexpr,
    CHUNK: tl.constexpr,
):
    row = tl.program_id(0)
    v = row // ROWS_PER_V
    scores_row = scores_ptr + row.to(tl.int64) * stride_row
    keys_row = keys_ptr + row.to(tl.int64) * N
    out_row = out_ptr + row.to(tl.int64) * stride_out
    old_len = tl.load(old_len_ptr + v).to(tl.int32)
    count = tl.minimum(tl.load(count_ptr + v).to(tl.int32), tl.minimum(old_len, WIDTH))
    recent = tl.floor(count.to(tl.float32) * recent_fraction).to(tl.int32)
    forced_from = old_len - recent
    offs = tl.arange(0, CHUNK)

    # Radix select of the count-th largest key from the top: two 4-bit digits, then three bytes.
    prefix = tl.zeros([], tl.uint32)
    need = count
    if count > 0:
        prefix, need = _nibble_pass(prefix, need, keys_row, scores_row, N, old_len, forced_from, 28, True,
                                    SINKS, LOOKBACK, LOOKAHEAD, BY_POSITION, CHUNK)
        prefix, need = _nibble_pass(prefix, need, keys_row, scores_row, N, old_len, forced_from, 24, False,
                                    SINKS, LOOKBACK, LOOKAHEAD, BY_POSITION, CHUNK)
        prefix, need = _byte_pass(prefix, need, keys_row, old_len, 16, CHUNK)
        prefix, need = _byte_pass(prefix, need, keys_row, old_len, 8, CHUNK)
        prefix, need = _byte_pass(prefix, need, keys_row, old_len, 0, CHUNK)

    # Emit keys above the threshold and the first ``need`` equal to it, in position order.
    taken = 0
    ties = 0
    for start in range(0, tl.where(count > 0, old_len, 0), CHUNK):
        pos = start + offs
        ok = pos < old_len
        key = tl.load(keys_row + pos, mask=ok, other=0).to(tl.uint32, bitcast=True)
        above = ok & (key > prefix)
        equal = ok & (key == prefix)
        tie_rank = ties + tl.cumsum(equal.to(tl.int32), 0) - 1
        chosen = above | (equal & (tie_rank < need))
        index = taken + tl.cumsum(chosen.to(tl.int32), 0) - 1
        tl.store(out_row + index, pos, mask=chosen)
        taken += tl.sum(chosen.to(tl.int32), 0)
        ties += tl.sum(equal.to(tl.int32), 0)
    for start in range(count, WIDTH, CHUNK):
        pos = start + offs
        tl.store(out_row + pos, tl.full([CHUNK], -1, tl.int32), mask=pos < WIDTH)


def select_tokens_triton(
    scores: torch.Tensor, old_len: torch.Tensor, count: torch.Tensor, width: int, *,
    lookback: int, lookahead: int, recent_fraction: float, sinks: int, by_position: bool,
    chunk: int = _CHUNK, num_warps: int = _NUM_WARPS,
) -> torch.Tensor:
    """Selected positions per (request, layer, KV head): [V, L, H, width] int32, ascending, -1 padded.

    The rule's knobs are ``selection.KernelRule``'s; the caller checks the policy has one. ``chunk``
    and ``num_warps`` are tuning overrides (positions per loop iteration, a power of 2 >= 256).
    """
    v, layers, heads, n = scores.shape
    out = torch.empty(v, layers, heads, width, dtype=torch.int32, device=scores.device)
    if out.numel() == 0:
        return out
    rows = scores.reshape(v * layers * heads, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    flat = out.view(-1, width)
    keys = torch.empty(rows.shape, dtype=torch.int32, device=scores.device)  # each row's keys, computed once
    _select_kernel[(v * layers * heads,)](
        rows, keys, old_len, count, flat, float(recent_fraction),
        n, width, layers * heads, rows.stride(0), flat.stride(0),
        SINKS=sinks, LOOKBACK=lookback, LOOKAHEAD=lookahead, BY_POSITION=by_position, CHUNK=chunk,
        num_warps=num_warps,
    )
    return out
