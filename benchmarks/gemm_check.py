"""The decode-step GEMMs of a Qwen3-8B shape, cuBLAS against the split-K Triton kernel, on the GPU.

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
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_sparsespec.generation.skinny_gemm import SkinnyConfig, skinny_linear

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
