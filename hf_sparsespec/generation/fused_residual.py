"""A decoder layer's residual adds folded into the RMSNorms that read them, while the engine runs a step.

A Llama-style decoder layer adds the attention output to its input and normalises the sum for the
MLP, then adds the MLP output, which the next layer normalises first: an elementwise add launch
before each norm, 72 per Qwen3-8B-shape step (~1.8 us each on an H200, plus a launch gap, of a
~7 ms draft step). ``fused_norm.add_rms_norm`` computes each sum and its norm in one launch.

Only layers whose forward is one of those read for this (``_RESIDUAL_LAYERS``, the same code in every
supported transformers version) run the replacement, and only when both their norms are ones the
fused norm kernel reproduces and carry no hooks; it calls the layer's attention and MLP as the
original does. The MLP's add meets the next layer's input norm: a layer returns the sum and keeps
its normalised copy for the next verified layer, which takes it only when given that very tensor,
unmodified (anything else, or a layer called out of order, normalises its input itself).
"""

from __future__ import annotations

import importlib
import inspect
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from .fused_norm import FusedNorms, add_rms_norm, epsilon_of

_RESIDUAL_LAYERS = (
    ("transformers.models.llama.modeling_llama", "LlamaDecoderLayer"),
    ("transformers.models.mistral.modeling_mistral", "MistralDecoderLayer"),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2DecoderLayer"),
    ("transformers.models.qwen3.modeling_qwen3", "Qwen3DecoderLayer"),
)


def _residual_forwards() -> set:
    forwards = set()
    for module_name, class_name in _RESIDUAL_LAYERS:
        try:
            forwards.add(getattr(importlib.import_module(module_name), class_name).forward)
        except (ImportError, AttributeError):
            continue
    return forwards


def _hookless(module: nn.Module) -> bool:
    return not module._forward_hooks and not module._forward_pre_hooks


def _version(x: torch.Tensor) -> int | None:
    return None if x.is_inference() else x._version


class _Carry:
    """The normalised copy of the last layer output, for the layer that should read it next."""

    def __init__(self) -> None:
        self.entry: tuple[nn.Module, torch.Tensor, int | None, torch.Tensor] | None = None

    def put(self, layer: nn.Module, output: torch.Tensor, normed: torch.Tensor) -> None:
        self.entry = (layer, output, _version(output), normed)

    def take(self, layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor | None:
        entry, self.entry = self.entry, None
        if entry is None or entry[0] is not layer or entry[1] is not hidden_states or entry[2] != _version(hidden_states):
            return None
        return entry[3]


def _add_norm(x: torch.Tensor, residual: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual + x`` and its norm: one launch where the kernel takes the tensors, else as the layer would."""
    if x.shape == residual.shape and x.dtype == residual.dtype and x.is_contiguous() and residual.is_contiguous():
        return add_rms_norm(x, residual, norm.weight, epsilon_of(norm))
    total = residual + x
    return total, norm(total)


def _fused_forward(layer: nn.Module, following: nn.Module | None, carry: _Carry) -> Callable[..., torch.Tensor]:
    """The layer's forward with both residual adds in norm launches (the second in ``following``'s
    input norm, when there is a following verified layer)."""
    signature = inspect.signature(type(layer).forward.__get__(layer))
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    def forward(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # The original passes each of its arguments (defaults included) to the attention, by name.
        bound = signature.bind(hidden_states, *args, **kwargs)
        bound.apply_defaults()
        attention_kwargs = {name: value for name, value in bound.arguments.items() if name not in ("hidden_states", var_keyword)}
        attention_kwargs.update(bound.arguments.get(var_keyword, {}))
        normed = carry.take(layer, hidden_states)
        if normed is None:
            normed = layer.input_layernorm(hidden_states)
        attn_out, _ = layer.self_attn(hidden_states=normed, **attention_kwargs)
        hidden_states, normed = _add_norm(attn_out, hidden_states, layer.post_attention_layernorm)
        mlp_out = layer.mlp(normed)
        if following is None:
            return hidden_states + mlp_out
        output, normed = _add_norm(mlp_out, hidden_states, following.input_layernorm)
        carry.put(following, output, normed)
        return output

    return forward


class FusedResiduals:
    """The model's decoder layers whose residual adds the fused norm kernel takes over, swapped in on demand."""

    def __init__(self, model: nn.Module, norms: FusedNorms) -> None:
        verified, forwards = set(map(id, norms.modules)), _residual_forwards()
        self.layers: list[nn.Module] = [
            layer for layer in model.modules()
            if type(layer).forward in forwards and all(
                id(getattr(layer, name, None)) in verified and _hookless(getattr(layer, name))
                for name in ("input_layernorm", "post_attention_layernorm")
            )
        ]

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Within the block, each verified layer runs the fused forward."""
        if torch.is_grad_enabled():  # the kernel has no backward
            yield
            return
        carry = _Carry()
        # An instance-level forward someone else installed stays (and wins) meanwhile.
        layers = [layer for layer in self.layers if "forward" not in layer.__dict__]
        for layer, following in zip(layers, [*layers[1:], None]):
            layer.forward = _fused_forward(layer, following, carry)
        try:
            yield
        finally:
            for layer in layers:
                del layer.forward
