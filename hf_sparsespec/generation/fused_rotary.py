"""Rotary position embedding of queries and keys as one Triton kernel while the engine runs a step.

transformers applies rotary embeddings with about ten kernels per layer (two halves sliced, one
negated and concatenated, four products, two sums, for queries and keys), ~80 launches per step of
the bench model, each of a few microseconds at decode sizes. The fused kernel rotates every
(token, head) row of queries and keys in one launch per layer.

The modeling module's ``apply_rotary_pos_emb`` is replaced for the duration of the step's model
call, only in modules whose function the kernel reproduces (checked once against the function
itself on random input: partial or interleaved rotary variants keep their own code), and only for
the call shapes the kernel covers; anything else goes to the original function.

Qwen3 normalises each query and key head (q_norm, k_norm) just before the rotation: two more launches
per layer, 72 of a Qwen3-8B-shape draft step's ~540. In attention forwards known to hand those norms'
outputs straight to the rotary function (``_HEAD_NORM_ATTENTIONS``), the norms only record their input
and the rotary kernel normalises each row as it loads it.
"""

from __future__ import annotations

import importlib
import sys
from contextlib import contextmanager
from types import ModuleType
from typing import Callable, Iterator

import torch
import triton
import triton.language as tl

from .fused_norm import FusedNorms, epsilon_of, rms_norm


@triton.jit
def _rotate_row(x_row, c_row, s_row, o_row, w_ptr, eps, NORM: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    ok = cols < HALF
    x1 = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF + cols, mask=ok, other=0.0).to(tl.float32)
    if NORM:
        # The head's RMSNorm first, rounded where transformers rounds: the normalised row to the
        # input dtype, then the weighted row (fused_norm.rms_norm's formula).
        inv = 1.0 / tl.sqrt_rn((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF) + eps)
        w1 = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + cols, mask=ok, other=0.0).to(tl.float32)
        x1 = (w1 * (x1 * inv).to(o_row.dtype.element_ty).to(tl.float32)).to(o_row.dtype.element_ty).to(tl.float32)
        x2 = (w2 * (x2 * inv).to(o_row.dtype.element_ty).to(tl.float32)).to(o_row.dtype.element_ty).to(tl.float32)
    c1 = tl.load(c_row + cols, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(c_row + HALF + cols, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(s_row + cols, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(s_row + HALF + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(o_row + cols, (x1 * c1 - x2 * s1).to(o_row.dtype.element_ty), mask=ok)
    tl.store(o_row + HALF + cols, (x2 * c2 + x1 * s2).to(o_row.dtype.element_ty), mask=ok)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, q_weight_ptr, k_weight_ptr, q_eps, k_eps, q_heads, num_tokens,
    stride_qh, stride_qt, stride_kh, stride_kt, stride_ct, stride_qoh, stride_qot, stride_koh, stride_kot,
    HALF: tl.constexpr, BLOCK: tl.constexpr, NORM: tl.constexpr,
):
    """One program per (head, token) row of the queries, then of the keys: out = x * cos + rotate_half(x) * sin,
    x first normalised by the per-head RMSNorm with ``NORM``."""
    pid = tl.program_id(0).to(tl.int64)
    h, t = pid // num_tokens, pid % num_tokens
    c_row = cos_ptr + t * stride_ct
    s_row = sin_ptr + t * stride_ct
    if h < q_heads:
        _rotate_row(q_ptr + h * stride_qh + t * stride_qt, c_row, s_row, q_out_ptr + h * stride_qoh + t * stride_qot,
                    q_weight_ptr, q_eps, NORM, HALF, BLOCK)
    else:
        kh = h - q_heads
        _rotate_row(k_ptr + kh * stride_kh + t * stride_kt, c_row, s_row, k_out_ptr + kh * stride_koh + t * stride_kot,
                    k_weight_ptr, k_eps, NORM, HALF, BLOCK)


HeadNorm = tuple[torch.Tensor, float]  # an RMSNorm's weight and epsilon


def _transposed_like(x: torch.Tensor) -> torch.Tensor:
    """An empty (1, H, T, D) tensor laid out as the transpose of a contiguous (1, T, H, D) one, as the
    model's projections give queries and keys."""
    return torch.empty(x.shape[0], x.shape[2], x.shape[1], x.shape[3], dtype=x.dtype, device=x.device).transpose(1, 2)


def rotate(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    norms: tuple[HeadNorm, HeadNorm] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x * cos + rotate_half(x) * sin`` for queries and keys x (1, H, T, D) (head counts may differ)
    and cos/sin (1, T, D), computed in float32, in one launch (one per layer instead of two).

    With ``norms`` ((q weight, eps), (k weight, eps)), x is first the per-head RMSNorm of the input
    (``fused_norm.rms_norm``): Qwen3's q_norm and k_norm in the same launch.

    Outputs keep the input's layout when it is contiguous or the transpose of a contiguous (1, T, H, D)
    tensor (how queries and keys reach it); any other input (a strided slice of a fused projection)
    gets the latter.
    """
    _, q_heads, tokens, dim = q.shape
    q_out, k_out = (torch.empty_like(x) if x.is_contiguous() or x.transpose(1, 2).is_contiguous() else _transposed_like(x)
                    for x in (q, k))
    if q.numel() + k.numel():
        half = dim // 2
        (q_weight, q_eps), (k_weight, k_eps) = norms if norms is not None else ((q, 0.0), (k, 0.0))
        _rotary_kernel[((q_heads + k.shape[1]) * tokens,)](
            q, k, cos, sin, q_out, k_out, q_weight, k_weight, q_eps, k_eps, q_heads, tokens,
            q.stride(1), q.stride(2), k.stride(1), k.stride(2),
            cos.stride(1), q_out.stride(1), q_out.stride(2), k_out.stride(1), k_out.stride(2),
            HALF=half, BLOCK=triton.next_power_of_2(half), NORM=norms is not None, num_warps=1,
        )
    return q_out, k_out


def _covered(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int,
             device: torch.device) -> bool:
    """Calls the kernel handles: on the engine's device (the swap is module-wide, so another model
    may call it meanwhile), one sequence, (1, H, T, D) with unit last stride, (1, T, D) tables."""
    return (
        q.device == device and unsqueeze_dim == 1 and q.dim() == 4 and k.dim() == 4 and q.shape[0] == 1 and k.shape[0] == 1
        and cos.shape == sin.shape == (1, q.shape[2], q.shape[3]) and k.shape[2:] == q.shape[2:]
        and q.shape[3] % 2 == 0 and cos.stride() == sin.stride() and cos.stride(-1) == 1
        and q.stride(-1) == 1 and k.stride(-1) == 1 and q.device == cos.device
    )


# Attention forwards whose q_norm and k_norm outputs go, transposed, to apply_rotary_pos_emb and nowhere
# else (checked by reading them, in every supported transformers version): their head norms can wait
# for the rotary kernel. A subclass overriding forward is another function, so it never qualifies.
_HEAD_NORM_ATTENTIONS = (
    ("transformers.models.qwen3.modeling_qwen3", "Qwen3Attention"),
    ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeAttention"),
)


def _head_norm_forwards() -> set:
    forwards = set()
    for module_name, class_name in _HEAD_NORM_ATTENTIONS:
        try:
            forwards.add(getattr(importlib.import_module(module_name), class_name).forward)
        except (ImportError, AttributeError):
            continue
    return forwards


def _view_key(x: torch.Tensor) -> tuple:
    """Identifies a view by what it reads: the tensor passed on is a new object over the same memory."""
    return x.data_ptr(), tuple(x.shape), x.stride()


class _DeferredHeadNorms:
    """Per-head norms whose forward, while swapped, records its input instead of normalising it; the
    rotary call that receives that input applies the norm in its own kernel."""

    def __init__(self) -> None:
        self.pending: dict[tuple, HeadNorm] = {}

    def forward_of(self, norm: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        weight, eps = norm.weight, epsilon_of(norm)

        def forward(x: torch.Tensor) -> torch.Tensor:
            self.pending[_view_key(x)] = (weight, eps)
            return x

        return forward

    def take(self, x: torch.Tensor) -> HeadNorm | None:
        """The norm still owed to rotary input x (1, H, T, D), the transpose of what the norm was given."""
        return self.pending.pop(_view_key(x.transpose(1, 2)), None)


def _fused(original: Callable, device: torch.device, deferred: _DeferredHeadNorms) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        norms = deferred.take(q), deferred.take(k)
        covered = _covered(q, k, cos, sin, unsqueeze_dim, device)
        if covered and None not in norms:
            return rotate(q, k, cos, sin, norms)
        # A norm owed to only one of them (or a call the kernel does not cover) is applied on its own.
        q, k = (x if norm is None else rms_norm(x, *norm) for x, norm in zip((q, k), norms))
        return rotate(q, k, cos, sin) if covered else original(q, k, cos, sin, unsqueeze_dim)

    return apply_rotary_pos_emb


class FusedRotary:
    """The modeling modules of the model's attention layers whose rotary function the kernel reproduces,
    and the per-head q/k norms (Qwen3's) that it applies in the same launch."""

    def __init__(self, model: torch.nn.Module, norms: FusedNorms) -> None:
        names = {type(m).__module__ for m in model.modules() if hasattr(m, "q_proj")}
        parameter = next(model.parameters())
        self.device = parameter.device
        modules = [sys.modules[name] for name in sorted(names) if callable(getattr(sys.modules.get(name), "apply_rotary_pos_emb", None))]
        self.modules: list[ModuleType] = [
            module for module in modules if _reproduces(module.apply_rotary_pos_emb, parameter.dtype, parameter.device)
        ]
        # Only norms the fused norm kernel reproduces, of attentions whose rotary function runs the kernel.
        verified, forwards = set(map(id, norms.modules)), _head_norm_forwards()
        rotary_modules = {module.__name__ for module in self.modules}
        self.head_norms: list[torch.nn.Module] = [
            norm for attn in model.modules()
            if type(attn).forward in forwards and type(attn).__module__ in rotary_modules
            and all(id(getattr(attn, name, None)) in verified for name in ("q_norm", "k_norm"))
            for norm in (attn.q_norm, attn.k_norm)
        ]

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Within the block, the verified modules' ``apply_rotary_pos_emb`` runs the kernel, normalising
        the heads of the verified attentions on the way."""
        deferred = _DeferredHeadNorms()
        originals = [module.apply_rotary_pos_emb for module in self.modules]
        for module, original in zip(self.modules, originals):
            module.apply_rotary_pos_emb = _fused(original, self.device, deferred)
        # The fused norm kernel's forward (FusedNorms swaps first) comes back afterwards.
        saved = [norm.__dict__.get("forward") for norm in self.head_norms]
        for norm in self.head_norms:
            norm.forward = deferred.forward_of(norm)
        try:
            yield
            if deferred.pending:  # a norm's output reached something other than the rotary function
                raise RuntimeError(f"{len(deferred.pending)} deferred q/k norms were never applied: the attention "
                                   "forward no longer matches the one fused_rotary was written for")
        finally:
            for module, original in zip(self.modules, originals):
                module.apply_rotary_pos_emb = original
            for norm, forward in zip(self.head_norms, saved):
                if forward is None:
                    del norm.forward
                else:
                    norm.forward = forward


@torch.no_grad()
def _reproduces(function: Callable, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the kernel matches ``function`` (within rounding) on random queries and keys."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    tokens, dim = 5, 64

    def draw(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    q, k = draw(1, tokens, 4, dim).transpose(1, 2), draw(1, tokens, 2, dim).transpose(1, 2)
    angles = torch.rand(1, tokens, dim // 2, generator=generator) * 6.3
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(device, dtype), angles.sin().to(device, dtype)
    try:
        expected = function(q, k, cos, sin)
    except Exception:  # a different signature: not the function the kernel stands for
        return False
    if not (isinstance(expected, tuple) and len(expected) == 2 and expected[0].shape == q.shape):
        return False
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    return all(torch.allclose(x, e, rtol=tolerance, atol=tolerance) for x, e in zip(rotate(q, k, cos, sin), expected))
