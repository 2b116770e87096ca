"""Per-step attention metadata, published by the runner and read inside the model's layers.

The HF model runs unmodified on a packed batch of shape ``(1, T)``; its layers know nothing about
requests. The runner therefore publishes, for the duration of one forward, what the paged cache and
the attention function need: where each token's K/V goes, and which cached positions each row may
attend to. A module-level slot (as in nano-vllm) keeps this out of the model's call signature.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:
    from ..cache.paged_cache import PagedKVCache


@dataclass
class StepContext:
    """Metadata of one packed forward. Rows are contiguous runs of tokens of one request.

    Row kinds: a *full* row (prefill chunk, verification, or a draft before the request's first
    verification) attends causally to its whole cache; a *draft* row attends to its request's
    selected positions plus every position from ``tail_start`` on. Verification rows additionally
    write PillarAttn scores.

    Shapes: ``T`` packed tokens, ``R`` rows, ``S`` request slots, ``L`` layers, ``H`` KV heads.
    """

    cache: "PagedKVCache"
    slot_mapping: torch.Tensor  # [T] int64: pool slot that receives each token's K/V (-1: padding, skip)
    q_start: torch.Tensor  # [R] int32: first packed token of each row
    q_len: torch.Tensor  # [R] int32: tokens in each row (0 for padding rows)
    kv_len: torch.Tensor  # [R] int32: cached positions of the row's request after this step's write
    block_tables: torch.Tensor  # [R, max_pages] int32: the request's pages, -1 past its end
    is_draft: torch.Tensor  # [R] bool: sparse row
    tail_start: torch.Tensor  # [R] int32: a draft row sees every position >= this
    sel_slot: torch.Tensor  # [R] int64: the row's request slot in `selection` / `sel_count`
    selection: torch.Tensor  # [S, L, H, K] int32: selected positions, each < tail_start; -1 padding
    sel_count: torch.Tensor  # [S] int32: valid entries of each slot's selection
    score_row: torch.Tensor  # [R] int64: row of `scores` a verification row writes, -1 for none
    scores: torch.Tensor | None  # [V, L, H, max_kv] float32 PillarAttn scores, or None
    max_kv_len: int  # an upper bound of kv_len, known on the host without a sync
    use_triton: bool = False
    # Scores at block granularity: each position gets 1/score_block of its aligned block's mass
    # (1: per position). Kernels then sum the masses during the attention pass, reading K once.
    score_block: int = 1
    selection_mass: "SelectionMass | None" = None  # diagnostics only (reference path)
    # (first token, length) of each row, known on the host when every row is a prompt's first
    # chunk: such a step needs no cache reads, and plain causal attention over its own keys does.
    fresh_prefill_rows: list[tuple[int, int]] | None = None
    # Every row is a verification of drafts (known on the host; part of a CUDA graph's key), so the
    # kernels may size query tiles to hold a whole row instead of a decode step's one token.
    verification_only: bool = False
    # Every row is a draft with a selection (known on the host; part of a CUDA graph's key): each
    # row reads a few hundred positions, so the kernels may give it one program per KV head.
    draft_only: bool = False
    # Queries of a verification row (draft_len + 1; 0: unknown), known on the host: sizes the score
    # pass's query tile to hold one whole row.
    verify_len: int = 0
    # check_finite: [L + 1] bool on the device; entry l is set when layer l's attention output of a
    # real token (one that writes KV) is not finite, the last entry by the runner for the logits.
    nonfinite: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.q_len.shape[0]


class SelectionMass:
    """Diagnostics: how much of a draft's full attention its visible set (selection and tail) holds.

    For every draft query, the full causal softmax probability that falls on the positions the draft
    reads, averaged over query heads, is summed per layer. Sums stay on the device, so recording
    costs no host read while decoding; ``per_layer`` reads them once at the end.
    """

    def __init__(self, num_layers: int, device: torch.device) -> None:
        self.total = torch.zeros(num_layers, dtype=torch.float64, device=device)
        self.queries = torch.zeros(num_layers, dtype=torch.float64, device=device)

    def add(self, layer: int, mass: torch.Tensor) -> None:
        """``mass``: [n] captured probability of each of n draft queries."""
        self.total[layer] += mass.sum()
        self.queries[layer] += mass.numel()

    def per_layer(self) -> list[float]:
        """Mean captured mass per layer; empty when no draft ran with a selection."""
        if not bool((self.queries > 0).any()):
            return []
        return (self.total / self.queries.clamp(min=1)).tolist()


_current: StepContext | None = None


def get_step_context() -> StepContext:
    if _current is None:
        raise RuntimeError(
            "The 'sparsespec' attention and PagedKVCache run only inside a SparseSpec engine step. "
            "Generate with `model.generate(..., custom_generate='sparsespec')` instead of calling the model directly."
        )
    return _current


@contextmanager
def step_context(ctx: StepContext) -> Iterator[StepContext]:
    global _current
    previous, _current = _current, ctx
    try:
        yield ctx
    finally:
        _current = previous
