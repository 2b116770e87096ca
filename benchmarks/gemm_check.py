"""The decode-step GEMMs of a Qwen3-8B shape, cuBLAS against a split-K Triton kernel, on the GPU.

The question (session 12): cuBLAS read the q/k/v, o_proj and down_proj weights of a 64-row draft step
at 2.7-3.2 TB/s (session 11's profile); does a kernel that also splits the reduction dimension, so
that every SM streams its share of the weight, do better? It did not (results/h200/session12/au_gemm):
the best configurations ran within 2-6% of cuBLAS either way, so the kernel lives here, not in the
package. Both lose the same few microseconds per GEMM to launch, ramp-up and drain, which at 64 rows
is what keeps a 33 MB weight from its floor.

Each shape runs as a chain over 36 distinct weights (the LM head over 4), the way a step meets them,
so no weight is still in L2 when it is read; one CUDA graph per (shape, method), replayed, median of
the replays. Figures: us per GEMM and the weight-read rate. Each Triton configuration is checked
against cuBLAS (max relative difference) before it is timed.

    python benchmarks/gemm_check.py --out DIR [--rows 64]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
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


SHAPES = {  # name: (N, K, copies)
    "qkv": (6144, 4096, 36),
    "o_proj": (4096, 4096, 36),
    "gate_up": (24576, 4096, 36),
    "down": (4096, 12288, 36),
    "lm_head": (151936, 4096, 4),
}


def configs() -> list[SkinnyConfig]:
    out = []
    for block_n, block_k, split, stages in itertools.product((32, 64, 128), (64, 128, 256), (1, 2, 4, 8), (3, 4)):
        if block_n * block_k <= 128 * 128:
            out.append(SkinnyConfig(block_n, block_k, split, stages, 4))
    return out


def timed(fn, replays: int = 12) -> float:
    """Median us of one call of ``fn`` (which runs the whole chain), from a CUDA graph."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[64])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--top", type=int, default=5, help="Triton configurations to print per shape")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for rows in args.rows:
        for name in args.shapes:
            n, k, copies = SHAPES[name]
            weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            nbytes = n * k * 2
            row = {"rows": rows, "shape": name, "n": n, "k": k}
            cublas = timed(lambda: [F.linear(x, w) for w in weights]) / copies
            row["cublas_us"] = cublas
            transposed = timed(lambda: [(w @ x.T).T.contiguous() for w in weights]) / copies
            row["cublas_transposed_us"] = transposed
            expected = F.linear(x, weights[0]).float()
            triton_rows = []
            for config in configs():
                if not config.fits(n, k):
                    continue
                try:
                    got = skinny_linear(x, weights[0], config).float()
                except Exception as exc:  # a configuration that does not compile (shared memory)
                    triton_rows.append({"config": vars(config), "error": repr(exc)[:120]})
                    continue
                diff = ((got - expected).abs().max() / expected.abs().max()).item()
                us = timed(lambda: [skinny_linear(x, w, config) for w in weights]) / copies
                triton_rows.append({"config": vars(config), "us": us, "rel_diff": diff})
            ok = sorted((r for r in triton_rows if "us" in r), key=lambda r: r["us"])
            row["triton"] = ok
            row["errors"] = [r for r in triton_rows if "error" in r]
            results.append(row)
            print(f"rows {rows} {name} N={n} K={k}: cuBLAS {cublas:.1f} us ({nbytes / cublas / 1e6:.2f} TB/s), "
                  f"transposed {transposed:.1f} us ({nbytes / transposed / 1e6:.2f} TB/s); "
                  f"{len(row['errors'])} configs failed", flush=True)
            for r in ok[: args.top]:
                print(f"    triton {r['config']}: {r['us']:.1f} us ({nbytes / r['us'] / 1e6:.2f} TB/s), "
                      f"rel diff {r['rel_diff']:.1e}", flush=True)
            del weights
            torch.cuda.empty_cache()
            (args.out / "gemm_check.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
