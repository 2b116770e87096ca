"""Pure-PyTorch PillarAttn over the paged pool: the CPU path and the oracle for the Triton kernels.

One Python iteration per row keeps the semantics obvious; speed is the kernels' job.
"""

from __future__ import annotations

import torch

from .context import StepContext
from .selection import block_masses


def gather_positions(pool: torch.Tensor, block_table: torch.Tensor, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    """Rows of ``pool`` ([slots, H, D]) holding the given logical positions of one request."""
    pages = block_table[torch.div(positions, page_size, rounding_mode="floor")].long()
    return pool[pages * page_size + positions % page_size]


def visible_positions_mask(ctx: StepContext, row: int, layer: int, kv_len: int, num_kv_heads: int) -> torch.Tensor | None:
    """[H, kv_len] bool of what a draft row may read (before the causal cut); None for full rows."""
    if not bool(ctx.is_draft[row]):
        return None
    keep = torch.zeros(num_kv_heads, kv_len, dtype=torch.bool, device=ctx.selection.device)
    keep[:, int(ctx.tail_start[row]) :] = True
    slot = int(ctx.sel_slot[row])
    count = int(ctx.sel_count[slot])
    if count:
        keep.scatter_(1, ctx.selection[slot, layer, :, :count].long(), True)
    return keep


def reference_attention(
    query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, ctx: StepContext, layer: int, scaling: float
) -> torch.Tensor:
    """Attention for a packed batch. ``query`` is (1, Hq, T, D); returns (1, T, Hq, D).

    Verification rows also write ``ctx.scores[score_row, layer]``: the softmax probabilities averaged
    over the query heads of each KV group and over the row's queries (masked entries count as 0),
    or with ``ctx.score_block > 1`` each position's equal share of its aligned block's sum of them.
    """
    q = query[0].transpose(0, 1)  # [T, Hq, D]
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[1]
    group = num_q_heads // num_kv_heads
    page_size = ctx.cache.page_size
    out = torch.zeros(num_tokens, num_q_heads, head_dim, dtype=query.dtype, device=query.device)
    for row in range(ctx.num_rows):
        n = int(ctx.q_len[row])
        if n == 0:
            continue
        start, kv_len = int(ctx.q_start[row]), int(ctx.kv_len[row])
        positions = torch.arange(kv_len, device=q.device)
        keys = gather_positions(k_pool, ctx.block_tables[row], positions, page_size).float()
        values = gather_positions(v_pool, ctx.block_tables[row], positions, page_size).float()
        q_row = q[start : start + n].float().view(n, num_kv_heads, group, head_dim)
        logits = torch.einsum("nhgd,lhd->hgnl", q_row, keys) * scaling
        query_positions = torch.arange(kv_len - n, kv_len, device=q.device)
        causal = (positions[None, :] <= query_positions[:, None])[None, None]  # [1, 1, n, kv]
        visible = causal
        keep = visible_positions_mask(ctx, row, layer, kv_len, num_kv_heads)
        if keep is not None:
            visible = causal & keep[:, None, None, :]
            if ctx.selection_mass is not None:
                full = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
                ctx.selection_mass.add(layer, (full * keep[:, None, None, :]).sum(-1).mean(dim=(0, 1)))
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        out[start : start + n] = torch.einsum("hgnl,lhd->nhgd", probs, values).reshape(n, num_q_heads, head_dim).to(out.dtype)
        score_row = int(ctx.score_row[row])
        if score_row >= 0:
            scores = probs.sum(dim=(1, 2)) / (group * n)
            block = ctx.score_block
            if block > 1:
                scores = block_masses(scores, block).repeat_interleave(block, dim=-1)[:, :kv_len] / block
            ctx.scores[score_row, layer, :, :kv_len] = scores
    return out.unsqueeze(0)
