"""The bare name ``custom_generate="sparsespec"``, resolved without the Hub or ``trust_remote_code``.

transformers resolves a ``custom_generate`` string with ``GenerationMixin.load_custom_generate``:
a Hub repo id or a local folder holding ``custom_generate/generate.py``, always behind
``trust_remote_code``. It has no registry of names, so this module wraps that one method and
claims exactly one string, ``"sparsespec"``; every other value reaches the original unchanged
(``"./sparsespec"`` still loads a local folder of that name).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from transformers import GenerationMixin

from .strategy import generate

NAME = "sparsespec"

# Set on our wrapper so a second install (re-import, importlib.reload) finds it and does nothing.
_HOOK_MARK = "_hf_sparsespec_hook"


def generate_by_name(model: torch.nn.Module, **generate_arguments: Any) -> Any:
    """What ``"sparsespec"`` resolves to: ``generate`` again, with the SparseSpec callable.

    The string path of ``generate`` hands over its raw arguments before any input preparation, and
    drops ``trust_remote_code`` and ``custom_generate`` itself. Re-entering ``GenerationMixin.generate``
    with the callable lets transformers prepare inputs, logits processors and stopping criteria as
    usual; ``streamer`` travels along so that it receives the prompt and the callable finds it.
    """
    return GenerationMixin.generate(model, custom_generate=generate, **generate_arguments)


def install() -> None:
    """Wrap ``GenerationMixin.load_custom_generate`` so that ``"sparsespec"`` resolves here. Idempotent."""
    original = GenerationMixin.load_custom_generate
    if getattr(original, _HOOK_MARK, False):
        return

    @functools.wraps(original)
    def load_custom_generate(
        self: GenerationMixin,
        pretrained_model_name_or_path: Any = None,
        trust_remote_code: bool | None = None,
        **kwargs: Any,
    ) -> Callable:
        if pretrained_model_name_or_path == NAME:
            return generate_by_name
        return original(self, pretrained_model_name_or_path, trust_remote_code=trust_remote_code, **kwargs)

    setattr(load_custom_generate, _HOOK_MARK, True)
    GenerationMixin.load_custom_generate = load_custom_generate
