"""The decoding loop: scheduler -> step builder -> model -> device-side sampling -> host bookkeeping."""

from __future__ import annotations

import functools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..attention.context import SelectionMass
from ..attention.selection import needs_scores, score_block, select_tokens
from ..cache.paged_cache import PagedKVCache
from ..config import SparseSpecConfig
from .request import Request, RowKind
from .runner import ModelRunner, SlotPageTable
from .graphs import StepGraphs, bucket
from .step_builder import build_step, padding_values, unshifted_slot
from .upload import upload
from .sampling import LogitsPlan, PositionState, verify_drafts
from .scheduler import Row, Scheduler


class NonFiniteError(FloatingPointError):
    """A step produced a NaN or infinite attention output or logit (raised with ``check_finite=True``)."""


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class SpecStats:
    """Counters of one generate call, reported as ``spec_stats``."""

    num_forward_passes: int = 0
    num_draft_steps: int = 0  # draft rows run (one token each)
    num_verify_steps: int = 0  # verification rows run
    num_plain_steps: int = 0  # of which rows of plain decoding in the batch's thin tail (``plain_tail``)
    num_drafts_verified: int = 0
    num_drafts_accepted: int = 0
    num_offloads: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    selection_mass_per_layer: list[float] | None = None  # diagnostics=True only
    # Per sequence of the caller's batch: a batch finishes with its slowest request, so the spread
    # says more about its speed than the mean.
    mean_accepted_per_sequence: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        verified_rounds = max(self.num_verify_steps - self.num_plain_steps, 1)
        return {
            "mean_accepted": self.num_drafts_accepted / verified_rounds,
            "acceptance_rate": self.num_drafts_accepted / max(self.num_drafts_verified, 1),
            "mean_draft_len": self.num_drafts_verified / verified_rounds,
            "num_draft_steps": self.num_draft_steps,
            "num_verify_steps": self.num_verify_steps,
            "num_plain_steps": self.num_plain_steps,
            "num_forward_passes": self.num_forward_passes,
            "num_offloads": self.num_offloads,
            "new_tokens": self.new_tokens,
            "seconds": self.seconds,
            "tokens_per_s": self.new_tokens / self.seconds if self.seconds > 0 else 0.0,
            "mean_accepted_per_sequence": self.mean_accepted_per_sequence,
            **({} if self.selection_mass_per_layer is None else {"selection_mass_per_layer": self.selection_mass_per_layer}),
        }


@dataclass
class StepResults:
    """What one iteration leaves for the host, possibly still in flight on the device."""

    rows: list[Row]
    commit_rows: list[int]  # indices into rows of ends of prefill and verification rows
    result_rows: list[int]  # for each commit row, its row of `host`
    host: torch.Tensor  # [n, 1 + k + 1]: accepted count, then committed tokens (-1 padded)
    event: torch.cuda.Event | None
    scores: list[torch.Tensor | None] = field(default_factory=list)  # per commit row, processed scores
    logits: list[torch.Tensor | None] = field(default_factory=list)
    nonfinite: torch.Tensor | None = None  # check_finite: this step's flags, on the host
    described: str = ""  # check_finite: the step, for the error

    def ready(self) -> bool:
        """Whether reading the results would not block the host."""
        return self.event is None or self.event.query()


class Engine:
    """Runs SparseSpec for a batch of requests over one model and one paged cache.

    Device state per slot: ``round_tokens`` (the round's first token and its drafts), the draft
    distributions, and the PillarAttn selection. The host never reads a draft token: it learns a
    request's tokens only when they are committed, one iteration later (delayed verification).
    """

    # Iterations queued on the device before the host waits for the oldest. With two, the host
    # reads iteration N while N + 1 runs, and a request that verified in N runs an early draft in
    # N + 1 (below) and its other rows from N + 2. With three it would run early drafts in N + 1 and
    # N + 2: more slack for a host whose work per iteration varies, but on the H200 (bench model,
    # 128 x 16k, one process: benchmarks/one_process_ab.py) 42.5-42.9k tokens/s against 40.6-42.9k
    # with two, no gain beyond the spread.
    IN_FLIGHT = 2
    # Whether a request runs its next round's first drafts in the iterations it would otherwise sit
    # out waiting for its verification's result (the device knows where they go; see
    # ``step_builder.build_step``): a round then takes draft_len + 1 iterations instead of + 2.
    EARLY_DRAFTS = True

    def __init__(self, model: torch.nn.Module, config: SparseSpecConfig, cache: PagedKVCache, num_slots: int, max_context: int):
        self.model, self.config, self.cache = model, config, cache
        device = cache.device
        k = config.draft_len
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        # One slot more than requests: padding entries of captured steps write there.
        self.dummy_slot = num_slots
        self.round_tokens = torch.zeros(num_slots + 1, k + 1, dtype=torch.long, device=device)
        self.sel_width = max(1, min(config.max_budget, config.budget(max_context)))
        self.selection = torch.full(
            (num_slots + 1, cache.num_layers, cache.num_kv_heads, self.sel_width), -1, dtype=torch.int32, device=device
        )
        self.sel_count = torch.zeros(num_slots + 1, dtype=torch.int32, device=device)
        # Tokens each slot's latest verification committed, for the early drafts after it; one entry
        # more stays 0 for every row the host places alone.
        self.commit_count = torch.zeros(unshifted_slot(num_slots) + 1, dtype=torch.long, device=device)
        self.num_slots = num_slots
        self.max_context = max_context
        on_cuda = device.type == "cuda"
        # Diagnostics measure inside the reference attention, so they run without kernels and graphs.
        use_triton = on_cuda and config.use_triton is not False and not config.diagnostics and _triton_available()
        use_graphs = use_triton and config.use_cuda_graphs is not False
        if config.use_triton and not use_triton:
            raise ValueError("use_triton=True needs a CUDA device with Triton installed; leave it unset to pick automatically.")
        if config.use_cuda_graphs and not use_graphs:
            raise ValueError("use_cuda_graphs=True needs CUDA and the Triton kernels; leave it unset to pick automatically.")
        self.copy_stream = torch.cuda.Stream(device) if on_cuda else None
        # Rounds may overshoot the committed length by a full draft before their pages are trimmed.
        self.max_kv = max_context + k + 1
        self.page_table = SlotPageTable(cache, num_slots + 1, cache.pages_for(self.max_kv))
        self.runner = ModelRunner(model, cache, self.round_tokens, self.selection, self.sel_count, self.page_table, use_triton,
                                  score_block(self.config.selection))
        if config.check_finite:
            self.runner.nonfinite = torch.zeros(cache.num_layers + 1, dtype=torch.bool, device=device)
        self.use_graphs = use_graphs
        # Captured graphs bake in the logits processors, so each processing plan gets its own set.
        self._graph_sets: dict[tuple, StepGraphs] = {}
        self.graphs: StepGraphs | None = None
        # Buffers that graphs write to must outlive a call: later calls replay the same graphs.
        self._draft_probs: torch.Tensor | None = None
        self._presence: torch.Tensor | None = None
        self.graph_scores = (
            torch.zeros(num_slots, cache.num_layers, cache.num_kv_heads, self.max_kv, dtype=torch.float32, device=device)
            if use_graphs and config.speculate
            else None
        )

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
        if plan.do_sample and self._draft_probs is None:
            self._draft_probs = torch.zeros(self.num_slots + 1, self.config.draft_len, self.vocab_size, device=device)
        if plan.needs_presence and self._presence is None:
            self._presence = torch.zeros(self.num_slots + 1, self.vocab_size + 1, dtype=torch.bool, device=device)
        self.draft_probs = self._draft_probs if plan.do_sample else None
        self.presence = self._presence if plan.needs_presence else None
        if self.use_graphs:
            self.graphs = self._graph_sets.setdefault(plan.signature, StepGraphs(device, padding_values(self.dummy_slot)))
        self.stats = SpecStats()
        self.runner.selection_mass = SelectionMass(self.cache.num_layers, device) if self.config.diagnostics else None
        self.scheduler = Scheduler(self.config, self.cache, self.num_slots)
        self.scheduler.add([r for r in requests if not self._done_before_start(r)])
        started = time.perf_counter()
        pending: deque[StepResults] = deque()  # launched iterations whose results the host has not read
        try:
            while self.scheduler.has_work or pending:
                rows = self.scheduler.plan() if self.scheduler.has_work else []
                if rows:
                    pending.append(self._launch(rows))
                if not self.config.delayed_verification:
                    while pending:
                        self._absorb(pending.popleft())
                    continue
                # Read finished iterations, never the one just queued. Wait only when nothing could be
                # queued or IN_FLIGHT iterations are: the device always has work first.
                while len(pending) > 1 and pending[0].ready():
                    self._absorb(pending.popleft())
                if pending and (not rows or len(pending) >= self.IN_FLIGHT):
                    self._absorb(pending.popleft())
        finally:
            for request in list(self.scheduler.active):
                self.scheduler.finish(request)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.stats.seconds = time.perf_counter() - started
        self.stats.num_offloads = self.scheduler.num_offloads
        if self.runner.selection_mass is not None:
            self.stats.selection_mass_per_layer = self.runner.selection_mass.per_layer()
        self.stats.new_tokens = sum(len(r.generated) for r in requests)
        self.stats.mean_accepted_per_sequence = [
            r.drafts_accepted / max(r.rounds, 1) for r in sorted(requests, key=lambda r: r.index)
        ]
        return self.stats

    def _done_before_start(self, request: Request) -> bool:
        if not request.prompt:
            raise ValueError(f"Row {request.index} of `input_ids` has no unpadded token; SparseSpec needs a non-empty prompt.")
        request.finished = request.max_new_tokens <= 0
        return request.finished

    # ---- device side -------------------------------------------------------------------------
    def _launch(self, rows: list[Row]) -> StepResults:
        """Queue one iteration on the device: forward, sampling, verification, selection."""
        with_scores = self.config.speculate and needs_scores(self.config.selection)
        step = build_step(rows, self.config, self.prompt_width, self.sel_width, with_scores, self.dummy_slot)
        if self.presence is not None:
            for row in rows:
                if row.kind is RowKind.PREFILL and row.request.prefilled == 0:
                    self._init_presence(row.request)
        self.page_table.sync(rows)
        arrays = {**step.inputs, **step.post}
        num_singles = len(step.post["single_pos"])
        captured = self.graphs is not None and not step.has_prefill and not (self.keep_scores or self.keep_logits)
        if captured:
            tokens = bucket(step.num_tokens)
            num_verify = len(step.post["v_slot"])
            verify = min(bucket(num_verify, at_least=1), self.num_slots) if num_verify else 0
            sizes = {name: verify if name.startswith("v_") else tokens for name in arrays}
            uniform = dict(verification_only=step.verification_only, draft_only=step.draft_only)
            results, scores, logits = self.graphs.run(
                arrays, sizes, functools.partial(self._device_step_captured, **uniform), variant=tuple(uniform.values()),
            )
            num_singles = tokens
        else:
            views = upload(arrays, self.cache.device)
            attn_scores = None
            num_verify = len(step.post["v_slot"]) if self.config.speculate else 0
            if num_verify:  # selection needs the buffer's shape even where no scores are written
                shape = (num_verify, self.cache.num_layers, self.cache.num_kv_heads, step.max_kv_len)
                attn_scores = torch.zeros(shape, dtype=torch.float32, device=self.cache.device)
            results, scores, logits = self._device_step(views, attn_scores, step.max_kv_len, step.fresh_prefill_rows,
                                                        step.verification_only, step.draft_only)
        self.stats.num_forward_passes += 1
        described = self._describe(rows, step, captured) if self.runner.nonfinite is not None else ""

        # Host state that does not depend on device results moves on now.
        for row in rows:
            req = row.request
            if row.kind is RowKind.PREFILL:
                req.prefilled += row.num_tokens
                req.waiting = req.prefill_done
            elif row.kind is RowKind.DRAFT:
                if row.early:
                    req.early_drafts += 1
                else:
                    req.drafted += 1
                self.stats.num_draft_steps += 1
            else:
                self.stats.num_verify_steps += 1
                self.stats.num_plain_steps += req.plain
                if self.config.speculate and not req.plain:
                    req.waiting = True
                    # As many early drafts as the next round has even if every draft is accepted
                    # (room for remaining - 1 drafts after the commit); an early draft of a request
                    # that then stops (EOS, a criterion) or turns plain is wasted, not wrong.
                    room = min(self.config.draft_len, req.remaining - req.round_len - 2)
                    req.early_room = max(room, 0) if self.EARLY_DRAFTS else 0
                else:
                    # Plain decoding commits exactly one token per row, so the next row's position
                    # is known now and its input token is already on the device: no need to wait.
                    req.num_cached += 1
                    req.in_flight += 1
        result_rows = step.commit_singles + [num_singles + j for j in range(len(step.post["v_slot"]))]
        out = self._results(rows, step, result_rows, results, scores, logits)
        out.described = described
        return out

    def _describe(self, rows: list[Row], step, captured: bool) -> str:
        """The step as a check_finite error names it (built at launch: requests move on before it is read)."""
        listed = "; ".join(
            f"request {r.request.index} {r.kind.value} x{r.num_tokens} (kv {r.request.kv_after(r.kind, r.num_tokens)}, "
            f"sparse {r.kind is RowKind.DRAFT and r.request.has_selection})"
            for r in rows
        )
        return (f"forward pass {self.stats.num_forward_passes} ({step.num_tokens} tokens, max kv {step.max_kv_len}, "
                f"captured graph: {captured}). Rows: {listed}")

    def _device_step_captured(self, views: dict[str, torch.Tensor], verification_only: bool, draft_only: bool):
        return self._device_step(views, self.graph_scores, self.max_kv, verification_only=verification_only,
                                 draft_only=draft_only)

    def _device_step(
        self,
        v: dict[str, torch.Tensor],
        attn_scores: torch.Tensor | None,
        max_kv: int,
        fresh_prefill_rows: list[tuple[int, int]] | None = None,
        verification_only: bool = False,
        draft_only: bool = False,
    ):
        """Everything an iteration does on the device; shapes come from the inputs alone, so this
        also runs under CUDA-graph capture. Returns ([n, k + 2] results, processed scores, logits)."""
        k = self.config.draft_len
        if self.runner.nonfinite is not None:
            self.runner.nonfinite.zero_()
        v = self._place_early_drafts(v)
        logits = self.runner.forward(v, attn_scores, max_kv, fresh_prefill_rows, verification_only, draft_only)
        scores = self.plan.apply(logits, self._position_state(v))
        parts = []
        if v["single_pos"].shape[0]:
            tokens, probs = self.plan.pick(scores[v["single_pos"]])
            self.round_tokens[v["single_slot"], v["single_col"]] = tokens
            if probs is not None:
                self.draft_probs[v["single_prob_slot"], (v["single_col"] - 1).clamp(min=0)] = probs
            committed = torch.where(v["single_commit"] > 0, tokens, -1)[:, None]
            if self.presence is not None:
                self._mark_present(v["single_slot"], committed)
            parts.append(torch.cat([torch.zeros_like(committed), torch.nn.functional.pad(committed, (0, k), value=-1)], 1))
        if v["v_slot"].shape[0]:
            accepted, tokens = self._verify(v, scores, attn_scores)
            parts.append(torch.cat([accepted[:, None], tokens], 1))
        if not parts:  # only prompt chunks that are not a prompt's last: nothing to commit yet
            return torch.zeros(0, k + 2, dtype=torch.long, device=scores.device), scores, logits
        return torch.cat(parts), scores, logits

    def _place_early_drafts(self, v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Moves early drafts past the tokens their verification committed (0 for every other row)."""
        count = self.commit_count
        return {**v, "positions": v["positions"] + count[v["early_tok"]], "kv_len": v["kv_len"] + count[v["early_row"]],
                "hf_length": v["hf_length"] + count[v["early_pos"]]}

    def _verify(self, v: dict[str, torch.Tensor], scores: torch.Tensor, attn_scores: torch.Tensor | None):
        device = scores.device
        k = self.config.draft_len
        slots, num_drafts = v["v_slot"], v["v_num_drafts"]
        # Each row's k+1 target positions as [R, k+1, V]; short rows repeat their last position.
        offsets = torch.arange(k + 1, device=device)[None, :].clamp(max=num_drafts[:, None])
        target = scores[v["v_start"][:, None] + offsets]
        drafts = self.round_tokens[slots, 1:]
        draft_probs = self.draft_probs[slots] if self.draft_probs is not None else None
        accepted, next_token = verify_drafts(target, drafts, num_drafts, draft_probs, self.plan.do_sample)
        cols = torch.arange(k + 1, device=device)[None, :]
        padded_drafts = torch.nn.functional.pad(drafts, (0, 1), value=-1)
        tokens = torch.where(cols < accepted[:, None], padded_drafts, -1)
        tokens = torch.where(cols == accepted[:, None], next_token[:, None], tokens)
        self.round_tokens[slots, 0] = next_token
        self.commit_count[slots] = accepted + 1
        if self.presence is not None:
            self._mark_present(slots, tokens)
        if attn_scores is not None:
            chosen = select_tokens(attn_scores[: slots.shape[0]], v["v_old_len"], v["v_count"], self.config.selection, self.sel_width,
                                   use_triton=self.runner.use_triton)
            self.selection[slots] = chosen
            self.sel_count[slots] = v["v_count"].to(torch.int32)
        return accepted, tokens

    def _results(self, rows, step, result_rows, results, scores, logits) -> StepResults:
        out = StepResults(rows, step.commit_rows, result_rows, results, None)
        flags = self.runner.nonfinite
        if not step.commit_rows and flags is None:
            return out
        if results.device.type == "cuda":
            # The copy runs on a side stream so the next iteration's kernels need not queue behind it.
            compute = torch.cuda.current_stream(results.device)
            self.copy_stream.wait_stream(compute)
            with torch.cuda.stream(self.copy_stream):
                out.host = torch.empty(results.shape, dtype=results.dtype, pin_memory=True)
                out.host.copy_(results, non_blocking=True)
                results.record_stream(self.copy_stream)
                if flags is not None:
                    out.nonfinite = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
                    out.nonfinite.copy_(flags, non_blocking=True)
                out.event = torch.cuda.Event()
                out.event.record()
            # A captured step's results live in a static buffer that the next replay rewrites.
            compute.wait_stream(self.copy_stream)
        elif flags is not None:
            out.nonfinite = flags.clone()
        if self.keep_scores or self.keep_logits:
            for row_positions in step.commit_positions():
                at = torch.from_numpy(row_positions).to(scores.device)
                out.scores.append(scores[at] if self.keep_scores else None)
                out.logits.append(logits[at] if self.keep_logits else None)
        return out

    def _position_state(self, index: dict) -> PositionState:
        """transformers-view lengths (and token presence) of every logits position."""
        state = PositionState(hf_length=index["hf_length"], prompt_width=self.prompt_width)
        if self.presence is not None:
            slots = index["pos_slot"]
            presence = self.presence[slots].clone()
            k = self.config.draft_len
            drafts = self.round_tokens[slots, 1:]
            in_view = torch.arange(k, device=slots.device)[None, :] < index["pos_extra"][:, None]
            presence.scatter_(1, torch.where(in_view, drafts, self.vocab_size), True)
            state.presence = presence[:, : self.vocab_size]
        return state

    def _init_presence(self, request: Request) -> None:
        ignore = self.plan.repetition_ignore(request.index)
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
        if results.nonfinite is not None and bool(results.nonfinite.any()):
            flags = results.nonfinite.tolist()
            where = f"layer {flags.index(True)}'s attention output" if any(flags[:-1]) else "the logits"
            raise NonFiniteError(f"A non-finite value appeared first in {where} in {results.described}")
        if not results.commit_rows:
            return
        host = results.host.tolist()
        for j, i in enumerate(results.commit_rows):
            row = results.rows[i]
            req = row.request
            req.waiting, req.early_room = False, 0
            if req.finished:
                continue
            m, tokens = host[results.result_rows[j]][0], host[results.result_rows[j]][1:]
            committed = self._commit(req, tokens[: m + 1], results, j)
            # A request turns plain while its last speculative row is processed (start_round below),
            # with nothing else of it in flight, so every row seen while it is plain ran plainly.
            plain_row = row.kind is RowKind.VERIFY and (not self.config.speculate or req.plain)
            if row.kind is RowKind.VERIFY and not plain_row:
                self.stats.num_drafts_verified += req.round_len
                self.stats.num_drafts_accepted += m
                req.acceptance.observe(m, req.round_len)
                req.rounds += 1
                req.drafts_accepted += m
            if req.finished:
                continue
            if plain_row:
                req.in_flight -= 1  # its position was taken at launch
            elif row.kind is RowKind.PREFILL:
                req.num_cached = len(req.prompt)
                req.tail_start, req.has_selection = 0, False
                self.scheduler.start_round(req, first=True)
            else:
                assert len(committed) == m + 1
                req.tail_start = req.num_cached
                req.num_cached += m + 1
                req.has_selection = self.config.speculate
                self.scheduler.start_round(req, first=False)
                self.cache.truncate(req.index, req.kv_written)  # keeps the early drafts' KV

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
