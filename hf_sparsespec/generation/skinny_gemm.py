"""``x @ weight.T`` for a few rows of x as a split-K Triton GEMM: the decode-step shape cuBLAS under-serves.

A Qwen3-8B-shape draft step multiplies 64 rows by every weight matrix once; each GEMM should run at
the speed of reading its weight. On an H200 (session 11 profile, ``benchmarks/results/h200/session11``)
cuBLAS read the gate/up weight at 3.98 TB/s and the LM head at 4.2, but q/k/v at 3.1, o_proj at 2.7
and down_proj at 3.2 (with its split-K reduction): ~0.45 ms of a 7.25 ms step above the weights'
floor. Too few output tiles for 132 SMs is the usual cause at 64 rows; this kernel also splits the
reduction dimension, so every SM streams its share of the weight, and sums the splits in a second,
deterministic launch (fixed order, no atomics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class SkinnyConfig:
    """Tile of one program: all rows, ``block_n`` output columns, a ``split``-th of the reduction."""

    block_n: int = 64
    block_k: int = 128
    split: int = 4
    stages: int = 4
    warps: int = 4

    def fits(self, n: int, k: int) -> bool:
        """Whether the shape tiles without remainders (the kernel masks rows only)."""
        return n % self.block_n == 0 and k % (self.block_k * self.split) == 0


@triton.jit
def _skinny_gemm_kernel(
    x_ptr, w_ptr, out_ptr, M, stride_xm, stride_wn, stride_os, stride_om, k_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (n, s): columns [n*BLOCK_N, +BLOCK_N) over reduction split s, into out[s] (fp32
    partials, or the final dtype when there is one split)."""
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_s * k_per_split + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_wn + ks[None, :]
    row_ok = (rows < M)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, k_per_split, BLOCK_K):
        x = tl.load(x_ptrs, mask=row_ok, other=0.0)
        w = tl.load(w_ptrs)
        acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out = out_ptr + pid_s * stride_os + rows[:, None] * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, numel, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    total = tl.load(part_ptr + offs, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT):
        total += tl.load(part_ptr + s * numel + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=ok)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, config: SkinnyConfig) -> torch.Tensor:
    """``x @ weight.T`` for 2-D x [M, K] with M <= 64, weight [N, K] contiguous, bf16 or fp16,
    accumulated in float32 and rounded once, like cuBLAS."""
    m, k = x.shape
    n = weight.shape[0]
    if not (m <= 64 and weight.shape[1] == k and config.fits(n, k) and weight.is_contiguous() and x.stride(-1) == 1):
        raise ValueError(f"skinny_linear does not cover x {tuple(x.shape)} @ weight {tuple(weight.shape)} with {config}")
    block_m = max(16, triton.next_power_of_2(m))
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    target = out if config.split == 1 else torch.empty(config.split, m, n, dtype=torch.float32, device=x.device)
    grid = (n // config.block_n, config.split)
    _skinny_gemm_kernel[grid](
        x, weight, target, m, x.stride(0), weight.stride(0), target.stride(0) if config.split > 1 else 0,
        n, k // config.split, BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_stages=config.stages, num_warps=config.warps,
    )
    if config.split > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](target, out, m * n, SPLIT=config.split, BLOCK=block, num_warps=4)
    return out


def skinny_linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The kernel's semantics in plain PyTorch: float32 products and sums, one rounding."""
    return (x.float() @ weight.float().T).to(x.dtype)
