"""The decoding loop: scheduler -> step builder -> model -> device-side sampling -> host bookkeeping."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..attention.selection import select_tokens
from ..cache.paged_cache import PagedKVCache
from ..config import SparseSpecConfig
from .request import Request, RowKind
from .runner import ModelRunner, StepBuilder
from .sampling import LogitsPlan, PositionState, verify_drafts
from .scheduler import Row, Scheduler


@dataclass
class SpecStats:
    """Counters of one generate call, reported as ``spec_stats``."""

    num_forward_passes: int = 0
    num_draft_steps: int = 0  # draft rows run (one token each)
    num_verify_steps: int = 0  # verification rows run
    num_drafts_verified: int = 0
    num_drafts_accepted: int = 0
    num_offloads: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        verified_rounds = max(self.num_verify_steps, 1)
        return {
            "mean_accepted": self.num_drafts_accepted / verified_rounds,
            "acceptance_rate": self.num_drafts_accepted / max(self.num_drafts_verified, 1),
            "num_draft_steps": self.num_draft_steps,
            "num_verify_steps": self.num_verify_steps,
            "num_forward_passes": self.num_forward_passes,
            "num_offloads": self.num_offloads,
            "new_tokens": self.new_tokens,
            "seconds": self.seconds,
            "tokens_per_s": self.new_tokens / self.seconds if self.seconds > 0 else 0.0,
        }


@dataclass
class StepResults:
    """What one iteration leaves for the host, still possibly in flight on the device."""

    rows: list[Row]
    commit_rows: list[int]  # indices into rows of prefill-final and verification rows
    tokens: torch.Tensor  # [len(commit_rows), width]: committed tokens, -1 padded
    accepted: torch.Tensor  # [len(commit_rows)]
    event: torch.cuda.Event | None
    scores: list[torch.Tensor | None] = field(default_factory=list)  # per commit row, processed scores
    logits: list[torch.Tensor | None] = field(default_factory=list)


class Engine:
    """Runs SparseSpec for a batch of requests over one model and one paged cache."""

    def __init__(self, model: torch.nn.Module, config: SparseSpecConfig, cache: PagedKVCache, num_slots: int, max_context: int):
        self.model, self.config, self.cache = model, config, cache
        device = cache.device
        k = config.draft_len
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.round_tokens = torch.zeros(num_slots, k + 1, dtype=torch.long, device=device)
        self.sel_width = max(1, min(config.max_budget, config.budget(max_context)))
        self.selection = torch.full(
            (num_slots, cache.num_layers, cache.num_kv_heads, self.sel_width), -1, dtype=torch.int32, device=device
        )
        self.sel_count = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self.num_slots = num_slots
        self.max_context = max_context
        self.builder = StepBuilder(cache, self.round_tokens, self.selection, self.sel_count)
        self.runner = ModelRunner(model, cache)
        self.use_triton = bool(config.use_triton) and device.type == "cuda"

    # ---- one generate call -------------------------------------------------------------------
    def run(
        self,
        requests: list[Request],
        plan: LogitsPlan,
        eos_ids: set[int],
        stop_check: Callable[[Request], bool] | None = None,
        on_commit: Callable[[Request, list[int]], None] | None = None,
        keep_scores: bool = False,
        keep_logits: bool = False,
        prompt_width: int = 0,
    ) -> SpecStats:
        """Decode every request to completion; tokens land in ``request.generated``."""
        self.prompt_width = prompt_width
        self.plan, self.eos_ids, self.stop_check, self.on_commit = plan, eos_ids, stop_check, on_commit
        self.keep_scores, self.keep_logits = keep_scores, keep_logits
        device = self.cache.device
        self.draft_probs = (
            torch.zeros(self.num_slots, self.config.draft_len, self.vocab_size, device=device) if plan.do_sample else None
        )
        self.presence = (
            torch.zeros(self.num_slots, self.vocab_size + 1, dtype=torch.bool, device=device) if plan.needs_presence else None
        )
        self.stats = SpecStats()
        self.scheduler = Scheduler(self.config, self.cache, self.num_slots)
        self.scheduler.add([r for r in requests if not self._done_before_start(r)])
        started = time.perf_counter()
        pending: StepResults | None = None
        try:
            while self.scheduler.has_work or pending is not None:
                rows = self.scheduler.plan() if self.scheduler.has_work else []
                launched = self._launch(rows) if rows else None
                if pending is not None:
                    self._absorb(pending)
                pending = launched
                if not self.config.delayed_verification and pending is not None:
                    self._absorb(pending)
                    pending = None
        finally:
            for request in list(self.scheduler.active):
                self.scheduler.finish(request)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.stats.seconds = time.perf_counter() - started
        self.stats.num_offloads = self.scheduler.num_offloads
        self.stats.new_tokens = sum(len(r.generated) for r in requests)
        return self.stats

    def _done_before_start(self, request: Request) -> bool:
        if not request.prompt:
            raise ValueError(f"Row {request.index} of `input_ids` has no unpadded token; SparseSpec needs a non-empty prompt.")
        request.finished = request.max_new_tokens <= 0
        return request.finished

    # ---- device side -------------------------------------------------------------------------
    def _launch(self, rows: list[Row]) -> StepResults:
        speculate = self.config.speculate
        step = self.builder.build(rows, with_scores=speculate, use_triton=self.use_triton)
        for row in rows:
            if row.kind is RowKind.PREFILL and row.request.prefilled == 0 and self.presence is not None:
                self._init_presence(row.request)
        logits = self.runner.forward(step)
        scores = self.plan.apply(logits, self._position_state(rows, step.logits_start, logits.shape[0]))
        self.stats.num_forward_passes += 1

        single, single_rows = [], []  # positions sampled directly: drafts and ends of prefill
        verify_rows = []
        for i, row in enumerate(rows):
            if row.kind is RowKind.VERIFY:
                verify_rows.append(i)
            elif step.logits_start[i] >= 0:
                single.append(step.logits_start[i])
                single_rows.append(i)
        width = self.config.draft_len + 1
        commit_rows: list[int] = []
        commit_tokens: list[torch.Tensor] = []
        commit_accepted: list[torch.Tensor] = []
        kept_scores: list[torch.Tensor | None] = []
        kept_logits: list[torch.Tensor | None] = []
        device = self.cache.device

        if single:
            index = torch.tensor(single, device=device)
            tokens, probs = self.plan.pick(scores[index])
            slots = torch.tensor([rows[i].request.slot for i in single_rows], device=device)
            cols = torch.tensor(
                [rows[i].request.drafted + 1 if rows[i].kind is RowKind.DRAFT else 0 for i in single_rows], device=device
            )
            self.round_tokens[slots, cols] = tokens
            is_draft = [rows[i].kind is RowKind.DRAFT for i in single_rows]
            if probs is not None and any(is_draft):
                sel = torch.tensor(is_draft, device=device)
                self.draft_probs[slots[sel], cols[sel] - 1] = probs[sel]
            if self.presence is not None and not all(is_draft):
                committed = torch.tensor([not d for d in is_draft], device=device)
                self._mark_present(slots[committed], tokens[committed][:, None])
            for j, i in enumerate(single_rows):
                if not is_draft[j]:
                    commit_rows.append(i)
                    commit_tokens.append(torch.nn.functional.pad(tokens[j : j + 1, None], (0, width - 1), value=-1))
                    commit_accepted.append(torch.zeros(1, dtype=torch.long, device=device))
                    kept_scores.append(scores[single[j] : single[j] + 1] if self.keep_scores else None)
                    kept_logits.append(logits[single[j] : single[j] + 1] if self.keep_logits else None)

        if verify_rows:
            accepted, tokens = self._verify(rows, verify_rows, step.logits_start, scores, step.context.scores)
            for j, i in enumerate(verify_rows):
                commit_rows.append(i)
                commit_tokens.append(tokens[j : j + 1])
                commit_accepted.append(accepted[j : j + 1])
                start, n = step.logits_start[i], rows[i].num_tokens
                kept_scores.append(scores[start : start + n] if self.keep_scores else None)
                kept_logits.append(logits[start : start + n] if self.keep_logits else None)

        # Host state that does not depend on device results moves on now.
        for row in rows:
            req = row.request
            if row.kind is RowKind.PREFILL:
                req.prefilled += row.num_tokens
                req.waiting = req.prefill_done
            elif row.kind is RowKind.DRAFT:
                req.drafted += 1
                self.stats.num_draft_steps += 1
            else:
                req.waiting = True
                self.stats.num_verify_steps += 1

        results = StepResults(rows, commit_rows, torch.zeros(0, width, dtype=torch.long), torch.zeros(0, dtype=torch.long), None)
        if commit_rows:
            tokens = torch.cat(commit_tokens)
            accepted = torch.cat(commit_accepted)
            if device.type == "cuda":
                results.tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
                results.accepted = torch.empty(accepted.shape, dtype=accepted.dtype, pin_memory=True)
                results.tokens.copy_(tokens, non_blocking=True)
                results.accepted.copy_(accepted, non_blocking=True)
                results.event = torch.cuda.Event()
                results.event.record()
            else:
                results.tokens, results.accepted = tokens, accepted
            results.scores, results.logits = kept_scores, kept_logits
        return results

    def _verify(self, rows, verify_rows, logits_start, scores, attn_scores):
        device = self.cache.device
        k = max(rows[i].request.round_len for i in verify_rows)
        reqs = [rows[i].request for i in verify_rows]
        slots = torch.tensor([r.slot for r in reqs], device=device)
        num_drafts = torch.tensor([r.round_len for r in reqs], device=device)
        # Gather each row's k+1 target positions into [R, k+1, V]; short rows repeat their last position.
        offsets = torch.arange(k + 1, device=device)[None, :].clamp(max=num_drafts[:, None])
        starts = torch.tensor([logits_start[i] for i in verify_rows], device=device)
        target = scores[starts[:, None] + offsets]
        drafts = self.round_tokens[slots, 1 : k + 1]
        draft_probs = self.draft_probs[slots, :k] if self.draft_probs is not None else None
        accepted, next_token = verify_drafts(target, drafts, num_drafts, draft_probs, self.plan.do_sample)
        cols = torch.arange(self.config.draft_len + 1, device=device)[None, :]
        padded_drafts = torch.nn.functional.pad(drafts, (0, self.config.draft_len + 1 - k), value=-1)
        tokens = torch.where(cols < accepted[:, None], padded_drafts, -1)
        tokens = torch.where(cols == accepted[:, None], next_token[:, None], tokens)
        self.round_tokens[slots, 0] = next_token
        if self.presence is not None:
            self._mark_present(slots, tokens)
        if attn_scores is not None:
            self._select(reqs, slots, attn_scores)
        return accepted, tokens

    def _select(self, reqs: list[Request], slots: torch.Tensor, attn_scores: torch.Tensor) -> None:
        device = self.cache.device
        old_len = [r.num_cached for r in reqs]
        counts = [min(self.config.budget(n), self.sel_width) for n in old_len]
        chosen = select_tokens(
            attn_scores,
            torch.tensor(old_len, device=device),
            torch.tensor(counts, device=device),
            self.config.selection,
            self.sel_width,
        )
        self.selection[slots] = chosen
        self.sel_count[slots] = torch.tensor(counts, dtype=torch.int32, device=device)

    def _position_state(self, rows: list[Row], logits_start: list[int], num_positions: int) -> PositionState:
        """HF-view lengths (and token presence) of every logits position."""
        device = self.cache.device
        width = self.prompt_width
        lengths = torch.empty(num_positions, dtype=torch.long)
        slots, extra = [], []
        for i, row in enumerate(rows):
            start = logits_start[i]
            if start < 0:
                continue
            req = row.request
            if row.kind is RowKind.VERIFY:
                for j in range(row.num_tokens):
                    lengths[start + j] = width + len(req.generated) + j
                    slots.append(req.slot)
                    extra.append(j)
            else:
                drafts_before = req.drafted if row.kind is RowKind.DRAFT else 0
                lengths[start] = width + len(req.generated) + drafts_before
                slots.append(req.slot)
                extra.append(drafts_before)
        state = PositionState(hf_length=lengths.to(device), prompt_width=width)
        if self.presence is not None:
            slot_t = torch.tensor(slots, device=device)
            presence = self.presence[slot_t].clone()
            k = self.config.draft_len
            drafts = self.round_tokens[slot_t, 1:]
            in_view = torch.arange(k, device=device)[None, :] < torch.tensor(extra, device=device)[:, None]
            presence.scatter_(1, torch.where(in_view, drafts, self.vocab_size), True)
            state.presence = presence[:, : self.vocab_size]
        return state

    def _init_presence(self, request: Request) -> None:
        ignore = self.plan.repetition_ignore
        row = request.hf_prefix[ignore:].to(self.cache.device)
        self.presence[request.slot] = False
        self.presence[request.slot, row] = True

    def _mark_present(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        rows = self.presence[slots]
        rows.scatter_(1, torch.where(tokens >= 0, tokens, self.vocab_size), True)
        self.presence[slots] = rows

    # ---- host side ---------------------------------------------------------------------------
    def _absorb(self, results: StepResults) -> None:
        """Apply an iteration's committed tokens to the host state (waits for its copies if needed)."""
        if results.event is not None:
            results.event.synchronize()
        tokens = results.tokens.tolist()
        accepted = results.accepted.tolist()
        for j, i in enumerate(results.commit_rows):
            row = results.rows[i]
            req = row.request
            req.waiting = False
            if req.finished:
                continue
            m = accepted[j]
            committed = self._commit(req, tokens[j][: m + 1], results, j)
            if row.kind is RowKind.VERIFY:
                self.stats.num_drafts_verified += req.round_len
                self.stats.num_drafts_accepted += m
            if req.finished:
                continue
            if row.kind is RowKind.PREFILL:
                req.num_cached = len(req.prompt)
                req.tail_start, req.has_selection = 0, False
                self.scheduler.start_round(req, first=True)
            else:
                assert len(committed) == m + 1
                req.tail_start = req.num_cached
                req.num_cached += m + 1
                req.has_selection = self.config.speculate
                self.cache.truncate(req.index, req.num_cached)
                self.scheduler.start_round(req, first=False)

    def _commit(self, req: Request, tokens: list[int], results: StepResults, j: int) -> list[int]:
        kept: list[int] = []
        for token in tokens:
            req.generated.append(token)
            kept.append(token)
            if token in self.eos_ids or req.remaining <= 0 or (self.stop_check is not None and self.stop_check(req)):
                self.scheduler.finish(req)
                break
        if results.scores and results.scores[j] is not None:
            req.scores.extend(results.scores[j][: len(kept)].unbind(0))
        if results.logits and results.logits[j] is not None:
            req.logits.extend(results.logits[j][: len(kept)].unbind(0))
        if self.on_commit is not None:
            self.on_commit(req, kept)
        return kept
