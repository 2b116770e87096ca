"""One prompt's decoding state as the host sees it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

from ..cache.paged_cache import HostKV
from .draft_length import AcceptanceEstimate


class RowKind(Enum):
    PREFILL = "prefill"
    DRAFT = "draft"
    VERIFY = "verify"


@dataclass
class Request:
    """Host-side state of one sequence.

    Positions ``[0, num_cached)`` hold full-attention KV. The round's first token (the last committed
    one, "t0") sits at position ``num_cached`` and lives on the device, as do the drafts after it.
    """

    index: int  # row of the caller's batch
    prompt: list[int]  # without padding
    hf_prefix: torch.Tensor  # the padded prompt row, as transformers' processors and criteria see it
    max_new_tokens: int
    slot: int | None = None  # engine slot: device buffers for tokens, draft probabilities, selection
    generated: list[int] = field(default_factory=list)
    prefilled: int = 0
    num_cached: int = 0
    round_len: int = 0  # drafts planned in this round
    plain: bool = False  # decodes without drafts from now on (the batch's thin tail)
    drafted: int = 0  # drafts already launched in this round
    tail_start: int = 0  # drafts always see positions >= this
    has_selection: bool = False
    waiting: bool = False  # results of its last commit are still on their way to the host
    # While its verification's result travels, the next round's first drafts may run already (at
    # positions the device resolves): `early_room` of them, as many as the next round surely has,
    # of which `early_drafts` have been launched.
    early_room: int = 0
    early_drafts: int = 0
    # Plain decoding (speculate=False) does not wait: its next row reads the sampled token on the
    # device, and this counts the tokens sampled there that the host has not read yet.
    in_flight: int = 0
    acceptance: AcceptanceEstimate = field(default_factory=AcceptanceEstimate)  # of its recent rounds
    rounds: int = 0  # verified rounds that had drafts
    drafts_accepted: int = 0
    finished: bool = False
    offloaded: HostKV | None = None
    scores: list[torch.Tensor] = field(default_factory=list)  # processed scores per generated token, if asked
    logits: list[torch.Tensor] = field(default_factory=list)  # raw logits per generated token, if asked

    @property
    def prefill_done(self) -> bool:
        return self.prefilled == len(self.prompt)

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.generated)

    @property
    def results_pending(self) -> bool:
        """Whether results of rows already run are still to reach the host."""
        return self.waiting or self.in_flight > 0

    @property
    def kv_written(self) -> int:
        """Positions whose KV exists in the pool (committed or drafted)."""
        if not self.prefill_done:
            return self.prefilled
        return self.num_cached + self.drafted

    def next_row(self) -> tuple[RowKind, int]:
        """Kind and token count of this request's next forward row."""
        if not self.prefill_done:
            return RowKind.PREFILL, len(self.prompt) - self.prefilled
        if self.drafted < self.round_len:
            return RowKind.DRAFT, 1
        return RowKind.VERIFY, self.round_len + 1

    def kv_after(self, kind: RowKind, n_tokens: int) -> int:
        """Cache length the row's request has after the row's K/V is written."""
        if kind is RowKind.PREFILL:
            return self.prefilled + n_tokens
        if kind is RowKind.DRAFT:
            return self.num_cached + self.drafted + 1
        return self.num_cached + self.round_len + 1
