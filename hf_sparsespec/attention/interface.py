"""The attention function registered in transformers' ``AttentionInterface`` as "sparsespec"."""

from __future__ import annotations

import torch
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
    if ctx.use_triton:
        from .triton_kernels import paged_attention

        return paged_attention(query, key, value, ctx, module.layer_idx, scale), None
    return reference_attention(query, key, value, ctx, module.layer_idx, scale), None


def register_attention() -> None:
    AttentionInterface.register(ATTENTION_NAME, sparsespec_attention)
