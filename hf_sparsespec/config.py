"""User-facing knobs of the SparseSpec strategy, validated in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

SELECTION_POLICIES = ("pillar", "pillar_block", "paper", "window")


@dataclass(frozen=True)
class SparseSpecConfig:
    """Parameters of sparse self-speculative decoding.

    Every field can be passed to ``model.generate(..., custom_generate="sparsespec")`` as a keyword.

    Args:
        draft_len: tokens drafted with sparse attention before each full-attention verification (k);
            with ``adaptive_draft``, the most a round drafts.
        adaptive_draft: let each request draft as many tokens per round (1 to ``draft_len``) as its
            recent acceptance pays for: short rounds where drafts are often rejected.
        budget_ratio: fraction of a request's context the draft attends to, besides the recent tail.
        min_budget: the draft attends to at least this many selected tokens.
        max_budget: and to at most this many.
        selection: how the draft's tokens are chosen: ``"pillar"`` (the project's default, see README),
            ``"pillar_block"`` (the same rule over the attention mass of aligned 16-token blocks,
            which the GPU kernels sum during verification instead of reading K a second time),
            ``"paper"`` (raw Top-K of the verification's attention, as published) or ``"window"``
            (4 sink tokens plus the most recent ones, MagicDec/StreamingLLM style).
        speculate: ``False`` runs the same engine without drafting (one verified token per step);
            a baseline, not a mode anyone needs for speed.
        page_size: tokens per KV page.
        kv_pool_tokens: capacity of the paged KV pool in tokens. ``None`` sizes it from
            ``kv_memory_fraction`` of free device memory on CUDA, or to fit the whole call on the CPU.
        kv_memory_fraction: share of free accelerator memory the pool may take when ``kv_pool_tokens`` is unset.
        max_batch_size: requests decoded at once; more prompts are admitted as earlier ones finish.
        prefill_chunk: prompt tokens processed per forward for one request.
        unified_schedule: stagger requests over draft phases so every forward mixes draft and
            verification rows of different requests (the paper's unified scheduler).
        verify_groups: with ``unified_schedule``, how many evenly spaced draft phases requests are
            spread over. ``None`` uses all ``draft_len + 1``, the most even load per forward; fewer
            groups verify more requests per forward and so pay each verification step's fixed costs
            (sampling, selection) less often, which pays off where those costs rival the KV reads.
        plain_tail: once no prompt waits and at most this fraction of the most requests the call has
            decoded at once is left, their new rounds decode plainly (one verified token per forward).
            Each draft is a forward of its own, so speculation never takes fewer forwards than plain
            decoding; it pays only where a forward's cost is mostly full-context KV reads, which a
            thinning batch no longer has, while its fixed per-forward cost stays. ``0`` speculates
            to the end.
        delayed_verification: read each iteration's results on the host while the next one runs, so
            the host's bookkeeping overlaps with the accelerator's work; a request that just verified
            runs its next draft meanwhile, at a position the device resolves.
        offload: move whole requests' KV to host memory when the pool runs out, instead of failing.
        use_triton: run the Triton kernels (CUDA only). ``None`` picks them when available.
        use_cuda_graphs: replay captured CUDA graphs for draft and verification steps. ``None`` picks
            them on CUDA.
        diagnostics: record, per verification, the attention mass the draft's selection captures.
        check_finite: debugging aid: check on the device that every layer's attention output and
            the logits of real tokens are finite, and raise ``NonFiniteError`` naming the first bad
            layer and the step's rows when the host reads that step's results. No extra host
            synchronisation, so steps still overlap as in a normal run.
    """

    draft_len: int = 8
    adaptive_draft: bool = False
    budget_ratio: float = 0.05
    min_budget: int = 128
    max_budget: int = 6144
    selection: str = "pillar"
    speculate: bool = True
    page_size: int = 16
    kv_pool_tokens: int | None = None
    kv_memory_fraction: float = 0.5
    max_batch_size: int = 128
    prefill_chunk: int = 4096
    unified_schedule: bool = True
    verify_groups: int | None = None
    plain_tail: float = 0.5
    delayed_verification: bool = True
    offload: bool = True
    use_triton: bool | None = None
    use_cuda_graphs: bool | None = None
    diagnostics: bool = False
    check_finite: bool = False

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")

        for name in ("draft_len", "min_budget", "max_budget", "page_size", "max_batch_size", "prefill_chunk"):
            positive_int(name)
        if not 0.0 < self.budget_ratio <= 1.0:
            raise ValueError(f"`budget_ratio` must be in (0, 1], got {self.budget_ratio!r}.")
        if self.min_budget > self.max_budget:
            raise ValueError(
                f"`min_budget` ({self.min_budget}) exceeds `max_budget` ({self.max_budget}); lower the first or raise the second."
            )
        if self.selection not in SELECTION_POLICIES:
            raise ValueError(f"`selection` must be one of {SELECTION_POLICIES}, got {self.selection!r}.")
        for name in ("kv_pool_tokens", "verify_groups"):
            if getattr(self, name) is not None:
                positive_int(name)
        if not 0.0 <= self.plain_tail < 1.0:
            raise ValueError(f"`plain_tail` must be in [0, 1) (0 speculates to the end), got {self.plain_tail!r}.")
        if not 0.0 < self.kv_memory_fraction < 1.0:
            raise ValueError(f"`kv_memory_fraction` must be in (0, 1), got {self.kv_memory_fraction!r}.")

    def budget(self, context_len: int) -> int:
        """Number of selected (non-tail) tokens a draft may attend to at this context length."""
        wanted = max(self.min_budget, math.ceil(self.budget_ratio * context_len))
        return min(wanted, self.max_budget, context_len)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
