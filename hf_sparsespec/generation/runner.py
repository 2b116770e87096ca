"""Turns planned rows into one packed forward of the unmodified HF model, eager or as a CUDA graph."""

from __future__ import annotations

import inspect
import torch

from ..attention.context import StepContext, step_context
from ..cache.paged_cache import PagedKVCache
from .scheduler import Row
from .step_builder import PADDING, ROW_FIELDS, TOKEN_FIELDS, HostStep, padded
from .upload import pack, upload

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
        views = upload(step.inputs, self.cache.device)
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
        positions, token_slot = views["positions"], views["token_slot"]
        page_size = self.cache.page_size
        pages = self.page_table.table[token_slot.clamp(min=0), torch.div(positions, page_size, rounding_mode="floor")]
        slot_mapping = torch.where(token_slot >= 0, pages * page_size + positions % page_size, -1)
        context = StepContext(
            cache=self.cache,
            slot_mapping=slot_mapping,
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
            out = self.model(input_ids=ids[None], position_ids=positions[None], **kwargs)
        logits = out.logits[0]
        if not self.keeps_logits:
            logits = logits[views["logits_index"]]
        return logits.float()

    # ---- CUDA graphs ---------------------------------------------------------------------------
    def _bucket(self, num_tokens: int) -> int:
        return max(8, 1 << (num_tokens - 1).bit_length())

    def _replay(self, step: HostStep) -> tuple[torch.Tensor, torch.Tensor | None]:
        bucket = self._bucket(step.num_tokens)
        if bucket not in self._graphs:
            self._capture(bucket)
        graph, meta, logits = self._graphs[bucket]
        meta.copy_(pack(padded(step.inputs, bucket), self.cache.device), non_blocking=True)
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
