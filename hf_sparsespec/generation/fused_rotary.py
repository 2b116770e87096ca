"""Rotary position embedding of queries and keys as one Triton kernel while the engine runs a step.

transformers applies rotary embeddings with about ten kernels per layer (two halves sliced, one
negated and concatenated, four products, two sums, for queries and keys), ~80 launches per step of
the bench model, each of a few microseconds at decode sizes. The fused kernel rotates every
(token, head) row of queries and keys in one launch per layer.

The modeling module's ``apply_rotary_pos_emb`` is replaced for the duration of the step's model
call, only in modules whose function the kernel reproduces (checked once against the function
itself on random input: partial or interleaved rotary variants keep their own code), and only for
the call shapes the kernel covers; anything else goes to the original function.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from types import ModuleType
from typing import Callable, Iterator

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_row(x_row, c_row, s_row, o_row, HALF: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    ok = cols < HALF
    x1 = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF + cols, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(c_row + cols, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(c_row + HALF + cols, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(s_row + cols, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(s_row + HALF + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(o_row + cols, (x1 * c1 - x2 * s1).to(o_row.dtype.element_ty), mask=ok)
    tl.store(o_row + HALF + cols, (x2 * c2 + x1 * s2).to(o_row.dtype.element_ty), mask=ok)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, q_heads, num_tokens,
    stride_qh, stride_qt, stride_kh, stride_kt, stride_ct, stride_qoh, stride_qot, stride_koh, stride_kot,
    HALF: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per (head, token) row of the queries, then of the keys: out = x * cos + rotate_half(x) * sin."""
    pid = tl.program_id(0).to(tl.int64)
    h, t = pid // num_tokens, pid % num_tokens
    c_row = cos_ptr + t * stride_ct
    s_row = sin_ptr + t * stride_ct
    if h < q_heads:
        _rotate_row(q_ptr + h * stride_qh + t * stride_qt, c_row, s_row, q_out_ptr + h * stride_qoh + t * stride_qot, HALF, BLOCK)
    else:
        kh = h - q_heads
        _rotate_row(k_ptr + kh * stride_kh + t * stride_kt, c_row, s_row, k_out_ptr + kh * stride_koh + t * stride_kot, HALF, BLOCK)


def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x * cos + rotate_half(x) * sin`` for queries and keys x (1, H, T, D) (head counts may differ)
    and cos/sin (1, T, D), computed in float32, in one launch (one per layer instead of two).

    Each output has its input's layout (queries and keys reach it as transposes of (1, T, H, D)).
    """
    _, q_heads, tokens, dim = q.shape
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if q.numel() + k.numel():
        half = dim // 2
        _rotary_kernel[((q_heads + k.shape[1]) * tokens,)](
            q, k, cos, sin, q_out, k_out, q_heads, tokens, q.stride(1), q.stride(2), k.stride(1), k.stride(2),
            cos.stride(1), q_out.stride(1), q_out.stride(2), k_out.stride(1), k_out.stride(2),
            HALF=half, BLOCK=triton.next_power_of_2(half), num_warps=1,
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


def _fused(original: Callable, device: torch.device) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if not _covered(q, k, cos, sin, unsqueeze_dim, device):
            return original(q, k, cos, sin, unsqueeze_dim)
        return rotate(q, k, cos, sin)

    return apply_rotary_pos_emb


class FusedRotary:
    """The modeling modules of the model's attention layers whose rotary function the kernel reproduces."""

    def __init__(self, model: torch.nn.Module) -> None:
        names = {type(m).__module__ for m in model.modules() if hasattr(m, "q_proj")}
        parameter = next(model.parameters())
        self.device = parameter.device
        modules = [sys.modules[name] for name in sorted(names) if callable(getattr(sys.modules.get(name), "apply_rotary_pos_emb", None))]
        self.modules: list[ModuleType] = [
            module for module in modules if _reproduces(module.apply_rotary_pos_emb, parameter.dtype, parameter.device)
        ]

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Within the block, the verified modules' ``apply_rotary_pos_emb`` runs the kernel."""
        originals = [module.apply_rotary_pos_emb for module in self.modules]
        for module, original in zip(self.modules, originals):
            module.apply_rotary_pos_emb = _fused(original, self.device)
        try:
            yield
        finally:
            for module, original in zip(self.modules, originals):
                module.apply_rotary_pos_emb = original


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
