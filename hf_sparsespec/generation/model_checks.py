"""Which models SparseSpec can run, with errors that say why not and what to do instead."""

from __future__ import annotations

import torch


def check_model_supported(model: torch.nn.Module, max_length: int) -> None:
    """Raise a clear error for a model whose attention SparseSpec cannot replace losslessly.

    The configuration checks come first: a hybrid or MLA model often also lacks attention-backend
    support, and naming its layer kind tells the user more than the missing backend does.
    """
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(
            f"{name} is an encoder-decoder model; SparseSpec supports decoder-only causal LMs. Use plain `generate` for it."
        )
    text = model.config.get_text_config()
    layer_types = set(getattr(text, "layer_types", None) or ["full_attention"])
    if layer_types - {"full_attention"}:
        raise ValueError(
            f"{name} has {sorted(layer_types - {'full_attention'})} layers; SparseSpec supports full-attention "
            "layers only (no sliding-window, linear-attention or recurrent layers). Use plain `generate` for this model."
        )
    window = getattr(text, "sliding_window", None)
    uses_window = getattr(text, "use_sliding_window", True)
    if window is not None and uses_window and window < max_length:
        raise ValueError(
            f"{name} uses sliding-window attention ({window} tokens) and this call reaches {max_length} tokens; "
            "SparseSpec supports full attention only. Generate at most the window's length, or set "
            "`model.config.sliding_window = None` if the checkpoint was trained without it."
        )
    if getattr(text, "kv_lora_rank", None) is not None:
        raise ValueError(
            f"{name} uses multi-head latent attention (MLA), which SparseSpec does not support. Use plain `generate` "
            "for it, or a checkpoint with standard multi-head or grouped-query attention (e.g. DeepSeek-R1-Distill-Qwen)."
        )
    if not getattr(model, "_supports_attention_backend", False) or not hasattr(model, "set_attn_implementation"):
        raise ValueError(
            f"{name} does not route attention through transformers' AttentionInterface, so SparseSpec cannot "
            "install its paged attention. Use plain `generate` for it, or a model whose modeling code supports "
            "custom attention backends (Llama, Mistral, Qwen2/3, Gemma, ...)."
        )
