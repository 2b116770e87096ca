"""The attention function registered in transformers' ``AttentionInterface`` as "sparsespec"."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .context import get_step_context
from .reference import reference_attention

ATTENTION_NAME = "sparsespec"


def sparsespec_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """PillarAttn for a packed mixed batch; ``key``/``value`` are the layer's paged pools.

    Which row attends to what comes from the engine's step context, not from ``attention_mask``
    (transformers builds none for an attention name it has no mask function for).
    """
    if softcap is not None or s_aux is not None:
        raise NotImplementedError("SparseSpec attention supports neither logit soft-capping nor attention sinks (s_aux).")
    if sliding_window is not None and sliding_window < get_step_context().max_kv_len:
        raise NotImplementedError(
            f"Layer {module.layer_idx} uses a sliding window of {sliding_window} tokens; SparseSpec supports full-attention layers only."
        )
    ctx = get_step_context()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if ctx.fresh_prefill_rows is not None:
        out = fresh_prefill_attention(query, key, value, ctx, scale)
    elif ctx.use_triton:
        from .triton_kernels import paged_attention

        out = paged_attention(query, key, value, ctx, module.layer_idx, scale)
    else:
        out = reference_attention(query, key, value, ctx, module.layer_idx, scale)
    if ctx.nonfinite is not None:
        # Padding tokens' outputs are never written, so only real tokens count; no host read here,
        # as this also runs under CUDA-graph capture.
        real = (ctx.slot_mapping >= 0)[:, None, None]
        ctx.nonfinite[module.layer_idx] |= ~torch.isfinite(torch.where(real, out[0], 0)).all()
    return out, None


def fresh_prefill_attention(
    query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, ctx, scale: float
) -> torch.Tensor:
    """Causal attention of prompts' first chunks over their own tokens, through PyTorch's fused SDPA.

    Nothing is cached before these rows, so the keys are exactly the ones this step just wrote.
    """
    # KV heads are repeated for the query heads rather than passed with enable_gqa=True: with it,
    # PyTorch's CPU (and float32 CUDA) SDPA falls back to the math kernel and materialises the
    # [Hq, T, T] probabilities (gigabytes for one 8k-token prompt).
    group = query.shape[1] // k_pool.shape[1]
    keys = k_pool[ctx.slot_mapping].transpose(0, 1).repeat_interleave(group, dim=0)  # [Hq, T, D]
    values = v_pool[ctx.slot_mapping].transpose(0, 1).repeat_interleave(group, dim=0)
    out = torch.empty_like(query)  # (1, Hq, T, D)
    for start, n in ctx.fresh_prefill_rows:
        rows = slice(start, start + n)
        out[0, :, rows] = F.scaled_dot_product_attention(
            query[:, :, rows], keys[None, :, rows], values[None, :, rows], is_causal=True, scale=scale
        )[0]
    return out.transpose(1, 2)


def register_attention() -> None:
    AttentionInterface.register(ATTENTION_NAME, sparsespec_attention)
