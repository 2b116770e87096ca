"""Decides, each iteration, which requests run which row, and where their KV lives.

Admission is continuous (a call may hold more prompts than ``max_batch_size``), rounds are
staggered over draft phases so verification rows spread evenly over iterations (the paper's unified
scheduler), the batch's thin tail decodes plainly (``plain_tail``), and when the pool runs out whole
requests move to host memory rather than failing.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

from ..cache.paged_cache import OutOfPages, PagedKVCache
from ..config import SparseSpecConfig
from .draft_length import best_draft_len
from .request import Request, RowKind


@dataclass
class Row:
    request: Request
    kind: RowKind
    num_tokens: int
    # One of a round's first drafts, launched while the verification before it is still in flight:
    # it sits after the 1 to round_len + 1 tokens that verification commits, a count only the
    # device knows yet.
    early: bool = False


class KVPoolTooSmall(MemoryError):
    pass


class Scheduler:
    def __init__(self, config: SparseSpecConfig, cache: PagedKVCache, num_slots: int) -> None:
        self.config = config
        self.cache = cache
        self.queue: deque[Request] = deque()
        self.active: list[Request] = []  # admission order
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.num_offloads = 0
        self.peak_live = 0  # most requests decoding at once in this call

    # ---- bookkeeping -------------------------------------------------------------------------
    def add(self, requests: list[Request]) -> None:
        self.queue.extend(requests)

    @property
    def has_work(self) -> bool:
        return bool(self.queue or self.active)

    def finish(self, request: Request) -> None:
        """A finished request gives back its pages and slot at once."""
        request.finished = True
        self.cache.release(request.index)
        request.offloaded = None
        self.active.remove(request)
        self.free_slots.append(request.slot)

    def start_round(self, request: Request, first: bool) -> None:
        """Set the number of drafts before the request's next verification."""
        request.plain = request.plain or self._thin_tail()
        speculate = self.config.speculate and not request.plain
        longest = min(self.config.draft_len, request.remaining - 1) if speculate else 0
        if self.config.adaptive_draft:
            longest = best_draft_len(request.acceptance.rate, longest)
        length = longest
        if first and self.config.unified_schedule and longest > 0:
            # Stagger: join the least crowded "iterations until verification" bucket among the groups'
            # evenly spaced ones (ties: more drafts). Later rounds all have the same length (unless
            # adaptive_draft varies it), so the request keeps its group.
            phases = longest + 1
            groups = min(self.config.verify_groups or phases, phases)
            choices = sorted({longest - i * phases // groups for i in range(groups)}, reverse=True)
            load = Counter(r.round_len - r.drafted for r in self.active if r is not request and r.prefill_done)
            length = min(choices, key=lambda v: load[v])
        # Early drafts count as the round's first; those past a shorter round's end are dropped (their
        # KV lies where the round's verification rewrites it, or past the cache's end).
        request.round_len, request.drafted = length, min(request.early_drafts, length)
        request.early_drafts = 0

    def _thin_tail(self) -> bool:
        """Whether so few requests are left that plain decoding beats speculation (``plain_tail``)."""
        return not self.queue and len(self.active) <= self.config.plain_tail * self.peak_live

    # ---- planning ----------------------------------------------------------------------------
    def plan(self) -> list[Row]:
        """Rows of the next forward, with their pages reserved."""
        self._restore_offloaded()
        self._admit()
        rows: list[Row] = []
        prefill_tokens = 0
        # A plain-decoding request whose remaining tokens are all in flight has nothing left to run.
        ready = [
            r for r in self.active
            if (not r.waiting or r.early_drafts < r.early_room) and r.offloaded is None and (r.in_flight == 0 or r.remaining > r.in_flight)
        ]
        # New prompts go alone: a step of nothing but prompts' first chunks needs no cache reads and
        # runs through fused dense attention, many times faster than mixed with paged decode rows.
        fresh = [r for r in ready if r.prefilled == 0]
        for request in fresh or ready:
            if request.waiting:
                # Pages up to the furthest position the draft can land on; the rest go back once the
                # verification's result is read. Never worth offloading another request for.
                furthest = request.num_cached + request.round_len + 2 + request.early_drafts
                if self._reserve(request, furthest, rows, may_offload=False):
                    rows.append(Row(request, RowKind.DRAFT, 1, early=True))
                continue
            kind, n = request.next_row()
            if kind is RowKind.PREFILL:
                chunk = min(n, self.config.prefill_chunk)
                if prefill_tokens + chunk > self.config.prefill_chunk:
                    continue  # whole chunks only: a cut chunk would add a needless continuation step
                n = chunk
            if not self._reserve(request, request.kv_after(kind, n), rows):
                continue
            if kind is RowKind.PREFILL:
                prefill_tokens += n
            rows.append(Row(request, kind, n))
        if not rows and not any(r.results_pending for r in self.active) and self.active:
            raise KVPoolTooSmall(self._too_small_message())
        return rows

    def _admit(self) -> None:
        if any(r.offloaded is not None for r in self.active):
            return  # offloaded requests resume first
        while self.queue and self.free_slots:
            request = self.queue[0]
            first_chunk = min(len(request.prompt), self.config.prefill_chunk)
            needed = self.cache.pages_for(first_chunk + self.config.draft_len + 1)
            if self.active and self.cache.allocator.num_free < needed:
                return
            self.queue.popleft()
            request.slot = self.free_slots.pop()
            self.active.append(request)
            self.peak_live = max(self.peak_live, len(self.active))

    def _restore_offloaded(self) -> None:
        for request in self.active:
            saved = request.offloaded
            if saved is None:
                continue
            headroom = self.cache.pages_for(saved.length + self.config.draft_len + 1)
            if self.cache.allocator.num_free < headroom:
                return  # keep FIFO order among offloaded requests
            self.cache.restore(request.index, saved)
            request.offloaded = None

    def _reserve(self, request: Request, length: int, planned: list[Row], may_offload: bool = True) -> bool:
        while True:
            try:
                self.cache.reserve(request.index, length)
                return True
            except OutOfPages:
                if not may_offload:
                    return False
                victim = self._pick_victim(request, planned) if self.config.offload else None
                if victim is None:
                    if not self.config.offload and not planned and not any(r.results_pending for r in self.active):
                        raise KVPoolTooSmall(
                            f"The KV pool ({self.cache.num_pages} pages of {self.cache.page_size} tokens) is full and "
                            "offload=False forbids moving requests to host memory. Enable `offload`, pass a larger "
                            "`kv_pool_tokens`, or a smaller `max_batch_size`."
                        ) from None
                    return False
                request_len = victim.kv_written
                victim.offloaded = self.cache.offload(victim.index, request_len)
                self.num_offloads += 1

    def _pick_victim(self, request: Request, planned: list[Row]) -> Request | None:
        in_plan = {id(row.request) for row in planned}
        candidates = [
            r
            for r in self.active
            if r is not request and not r.waiting and r.offloaded is None and id(r) not in in_plan and self.cache.pages(r.index)
        ]
        return candidates[-1] if candidates else None  # the latest admitted goes first

    def _too_small_message(self) -> str:
        return (
            f"The KV pool ({self.cache.num_pages} pages of {self.cache.page_size} tokens) cannot hold even one request "
            "of this call. Pass a larger `kv_pool_tokens` (or `kv_memory_fraction`), or shorten the prompt or `max_new_tokens`."
        )
