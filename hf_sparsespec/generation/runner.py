"""Turns planned rows into one packed forward of the unmodified HF model, eager or as a CUDA graph."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from ..attention.context import StepContext, step_context
from ..cache.paged_cache import PagedKVCache
from .request import RowKind
from .scheduler import Row
from .upload import pack, upload

TOKEN_FIELDS = ("ids_host", "gather", "positions", "slot_mapping", "logits_index")
ROW_FIELDS = ("q_start", "q_len", "kv_len", "is_draft", "tail_start", "sel_slot", "score_row")
# What a padding token or row holds: it writes no KV, attends to nothing and asks for no scores.
PADDING = {"ids_host": 0, "gather": -1, "positions": 0, "slot_mapping": -1, "logits_index": 0,
           "q_start": 0, "q_len": 0, "kv_len": 0, "is_draft": 0, "tail_start": 0, "sel_slot": 0, "score_row": -1}


@dataclass
class HostStep:
    """A packed step as host lists; tokens of all rows back to back."""

    arrays: dict[str, list[int]] = field(default_factory=lambda: {name: [] for name in TOKEN_FIELDS + ROW_FIELDS})
    logits_start: list[int] = field(default_factory=list)  # per row: first entry in logits_index, -1 if none
    num_scores: int = 0
    max_kv_len: int = 0
    has_prefill: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.arrays["positions"])

    @property
    def num_logits(self) -> int:
        return len(self.arrays["logits_index"])


class SlotPageTable:
    """Device copy of every slot's page list, updated with only the pages that changed.

    Kernels read a row's pages as ``table[sel_slot]``; sending whole block tables each step would cost
    more host time than the step itself at long contexts.
    """

    def __init__(self, cache: PagedKVCache, num_slots: int, max_pages: int) -> None:
        self.cache = cache
        self.table = torch.full((num_slots, max_pages), -1, dtype=torch.long, device=cache.device)
        self._mirror: list[tuple[int, int, int]] = [(-1, -1, 0)] * num_slots  # (seq_id, epoch, pages sent)

    def sync(self, rows: list[Row]) -> None:
        slots, cols, values = [], [], []
        for row in rows:
            req = row.request
            pages = self.cache.pages(req.index)
            seq, epoch, sent = self._mirror[req.slot]
            if seq != req.index or epoch != self.cache.epoch(req.index):
                sent = 0
            # Pages past a truncation may have been handed out again, possibly with other ids.
            sent = min(sent, self.cache.pages_unchanged_since_last_look(req.index))
            for col in range(sent, len(pages)):
                slots.append(req.slot)
                cols.append(col)
                values.append(pages[col])
            self._mirror[req.slot] = (req.index, self.cache.epoch(req.index), len(pages))
        if values:
            if max(cols) >= self.table.shape[1]:
                raise RuntimeError("a request outgrew the engine's page table; this is a bug in context sizing")
            up = upload({"slots": slots, "cols": cols, "values": values}, self.table.device)
            self.table[up["slots"], up["cols"]] = up["values"]


def build_host_step(rows: list[Row], cache: PagedKVCache, round_width: int, with_scores: bool) -> HostStep:
    """Host-side metadata of one step. Draft and verification tokens stay on the device: the step
    gathers them from the engine's per-slot ``round_tokens`` buffer (index ``slot * width + col``)."""
    step = HostStep()
    a = step.arrays
    page_size = cache.page_size
    for row in rows:
        req, n = row.request, row.num_tokens
        pages = cache.pages(req.index)
        num_before = step.num_tokens
        if row.kind is RowKind.PREFILL:
            start = req.prefilled
            a["ids_host"].extend(req.prompt[start : start + n])
            a["gather"].extend([-1] * n)
            step.has_prefill = True
            needs_logits = start + n == len(req.prompt)
            logit_tokens = [num_before + n - 1] if needs_logits else []
        else:
            col = req.drafted if row.kind is RowKind.DRAFT else 0
            start = req.num_cached + col
            a["ids_host"].extend([0] * n)
            base = req.slot * round_width + col
            a["gather"].extend(range(base, base + n))
            logit_tokens = list(range(num_before, num_before + n))
        positions = range(start, start + n)
        a["positions"].extend(positions)
        a["slot_mapping"].extend(pages[p // page_size] * page_size + p % page_size for p in positions)
        step.logits_start.append(step.num_logits if logit_tokens else -1)
        a["logits_index"].extend(logit_tokens)
        a["q_start"].append(num_before)
        a["q_len"].append(n)
        a["kv_len"].append(start + n)
        a["is_draft"].append(int(row.kind is RowKind.DRAFT and req.has_selection))
        a["tail_start"].append(req.tail_start)
        a["sel_slot"].append(req.slot)
        if row.kind is RowKind.VERIFY and with_scores:
            a["score_row"].append(step.num_scores)
            step.num_scores += 1
        else:
            a["score_row"].append(-1)
        step.max_kv_len = max(step.max_kv_len, start + n)
    return step


class ModelRunner:
    """Runs the HF model on packed steps with the paged cache.

    Decode-only steps (drafts and verifications) replay a CUDA graph captured per token-count bucket;
    graphs live as long as the engine, so later generate calls reuse them. Steps with prefill rows,
    and every step on the CPU, run eagerly.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cache: PagedKVCache,
        round_tokens: torch.Tensor,
        selection: torch.Tensor,
        sel_count: torch.Tensor,
        page_table: SlotPageTable,
        max_context: int,
        use_triton: bool,
        use_graphs: bool,
    ) -> None:
        self.model, self.cache = model, cache
        self.round_tokens, self.selection, self.sel_count = round_tokens, selection, sel_count
        self.page_table = page_table
        self.max_context = max_context
        self.use_triton, self.use_graphs = use_triton, use_graphs
        params = inspect.signature(model.forward).parameters
        # transformers renamed `past_key_values` to `cache` after 5.17; the old name warns there.
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.keeps_logits = "logits_to_keep" in params
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._graph_pool = None
        self._graph_scores: torch.Tensor | None = None

    def run(self, step: HostStep, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """float32 logits [num_logits, vocab] and the PillarAttn scores [num_scores, L, H, >= max_kv]."""
        self.page_table.sync(rows)
        if self.use_graphs and not step.has_prefill:
            return self._replay(step)
        views = upload(step.arrays, self.cache.device)
        scores = None
        if step.num_scores:
            shape = (step.num_scores, self.cache.num_layers, self.cache.num_kv_heads, step.max_kv_len)
            scores = torch.zeros(shape, dtype=torch.float32, device=self.cache.device)
        logits = self._forward(views, scores, step.max_kv_len)
        return logits, scores

    # ---- the forward, shared by eager runs and graph capture -------------------------------------
    def _forward(self, views: dict[str, torch.Tensor], scores: torch.Tensor | None, max_kv: int) -> torch.Tensor:
        gather = views["gather"]
        ids = torch.where(gather >= 0, self.round_tokens.view(-1)[gather.clamp(min=0)], views["ids_host"])
        sel_slot = views["sel_slot"]
        context = StepContext(
            cache=self.cache,
            slot_mapping=views["slot_mapping"],
            q_start=views["q_start"],
            q_len=views["q_len"],
            kv_len=views["kv_len"],
            block_tables=self.page_table.table[sel_slot],
            is_draft=views["is_draft"].bool(),
            tail_start=views["tail_start"],
            sel_slot=sel_slot,
            selection=self.selection,
            sel_count=self.sel_count,
            score_row=views["score_row"],
            scores=scores,
            max_kv_len=max_kv,
            use_triton=self.use_triton,
        )
        kwargs = {self.cache_kwarg: self.cache, "use_cache": True}
        if self.keeps_logits:
            kwargs["logits_to_keep"] = views["logits_index"]
        with step_context(context):
            out = self.model(input_ids=ids[None], position_ids=views["positions"][None], **kwargs)
        logits = out.logits[0]
        if not self.keeps_logits:
            logits = logits[views["logits_index"]]
        return logits.float()

    # ---- CUDA graphs ---------------------------------------------------------------------------
    def _bucket(self, num_tokens: int) -> int:
        return max(8, 1 << (num_tokens - 1).bit_length())

    def _padded_arrays(self, step: HostStep, tokens: int) -> dict[str, list[int]]:
        padded = {}
        for name, values in step.arrays.items():
            pad = tokens - len(values)  # rows never outnumber tokens, so one bucket size serves both
            padded[name] = values + [PADDING[name]] * pad
        return padded

    def _replay(self, step: HostStep) -> tuple[torch.Tensor, torch.Tensor | None]:
        bucket = self._bucket(step.num_tokens)
        if bucket not in self._graphs:
            self._capture(bucket)
        graph, meta, logits = self._graphs[bucket]
        meta.copy_(pack(self._padded_arrays(step, bucket), self.cache.device), non_blocking=True)
        graph.replay()
        return logits[: step.num_logits], (self._graph_scores if step.num_scores else None)

    def _capture(self, bucket: int) -> None:
        device = self.cache.device
        names = TOKEN_FIELDS + ROW_FIELDS
        meta = torch.tensor([PADDING[name] for name in names for _ in range(bucket)], dtype=torch.long, device=device)
        views = {name: meta[i * bucket : (i + 1) * bucket] for i, name in enumerate(names)}
        if self._graph_scores is None:
            slots = self.round_tokens.shape[0]
            self._graph_scores = torch.zeros(
                slots, self.cache.num_layers, self.cache.num_kv_heads, self.max_context, dtype=torch.float32, device=device
            )
        scores = self._graph_scores
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up compiles the kernels and settles the allocator
            for _ in range(2):
                self._forward(views, scores, self.max_context)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            logits = self._forward(views, scores, self.max_context)
        self._graphs[bucket] = (graph, meta, logits)
