"""CUDA graphs of whole decode iterations, captured per shape bucket and replayed.

An iteration (forward, logits processing, sampling, verification, selection) launches a few
hundred kernels; launched one by one from Python they cost more than the work itself for a small
model. Captured once per bucket of padded sizes, an iteration is one host-to-device copy of its
metadata plus one replay.
"""

from __future__ import annotations

from typing import Callable, Hashable

import numpy as np
import torch

from .upload import pack_padded

StepFn = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, ...]]


class StepGraphs:
    """Graphs keyed by a bucket of array sizes; all share one memory pool and live with the engine."""

    def __init__(self, device: torch.device, padding: dict[str, int]) -> None:
        self.device = device
        self.padding = padding
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, tuple[torch.Tensor, ...]]] = {}
        self._pool = None

    def run(self, arrays: dict[str, np.ndarray], sizes: dict[str, int], fn: StepFn, variant: Hashable = None) -> tuple[torch.Tensor, ...]:
        """Outputs of ``fn`` on ``arrays`` padded to ``sizes`` (name -> padded length); ``variant``
        tells apart steps of equal sizes that ``fn`` runs differently."""
        key = (variant, *(sizes[name] for name in arrays))
        if key not in self._graphs:
            self._capture(key, list(arrays), sizes, fn)
        graph, meta, outputs = self._graphs[key]
        meta.copy_(pack_padded(arrays, sizes, self.padding, self.device), non_blocking=True)
        graph.replay()
        return outputs

    def _capture(self, key: tuple, names: list[str], sizes: dict[str, int], fn: StepFn) -> None:
        meta = torch.tensor([self.padding[name] for name in names for _ in range(sizes[name])], dtype=torch.long,
                            device=self.device)
        views, start = {}, 0
        for name in names:
            views[name] = meta[start : start + sizes[name]]
            start += sizes[name]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up compiles kernels and settles the allocator
            for _ in range(2):
                fn(views)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = fn(views)
        self._graphs[key] = (graph, meta, outputs)


def bucket(n: int, at_least: int = 8) -> int:
    """Padded size of a step with ``n`` entries: powers of two up to 256, then multiples of a
    sixteenth of the next power of two.

    The number of captured graphs stays logarithmic in the batch size (8 sizes per doubling past
    256), while a large step pads by less than an eighth: a batch-64 verification of 9 tokens per
    row (576) runs as 576 tokens rather than 1024, and for an 8B model every padding token is
    ~16 GFLOP of GEMM work.
    """
    size = max(at_least, 1 << max(n - 1, 0).bit_length())
    if size <= 256:
        return size
    step = size // 16
    return -(-n // step) * step
