"""Turns planned rows into one packed forward of the unmodified HF model, eager or as a CUDA graph."""

from __future__ import annotations

import inspect
from contextlib import ExitStack

import torch

from ..attention.context import StepContext, step_context
from ..cache.paged_cache import PagedKVCache
from .fused_linear import FusedLinears
from .fused_norm import FusedNorms
from .fused_residual import FusedResiduals
from .fused_rotary import FusedRotary
from .scheduler import Row
from .upload import upload

class SlotPageTable:
    """Device copy of every slot's page list, updated with only the pages that changed.

    Kernels read a row's pages as ``table[sel_slot]``; sending whole block tables each step would cost
    more host time than the step itself at long contexts.
    """

    def __init__(self, cache: PagedKVCache, num_slots: int, max_pages: int) -> None:
        self.cache = cache
        self.table = torch.full((num_slots, max_pages), -1, dtype=torch.long, device=cache.device)
        # Which request each slot's row currently mirrors: a slot handed to a new request is resent whole.
        self._owner: list[int | None] = [None] * num_slots

    def sync(self, rows: list[Row]) -> None:
        slots, cols, values = [], [], []
        for row in rows:
            req = row.request
            first = self.cache.take_changes(req.index)
            if self._owner[req.slot] != req.index:
                self._owner[req.slot] = req.index
                first = 0
            if first is None:
                continue
            pages = self.cache.pages(req.index)
            for col in range(first, len(pages)):
                slots.append(req.slot)
                cols.append(col)
                values.append(pages[col])
        if values:
            if max(cols) >= self.table.shape[1]:
                raise RuntimeError("a request outgrew the engine's page table; this is a bug in context sizing")
            up = upload({"slots": slots, "cols": cols, "values": values}, self.table.device)
            self.table[up["slots"], up["cols"]] = up["values"]


class ModelRunner:
    """Runs the HF model on a packed step with the paged cache (with the Triton kernels, its
    RMSNorms, rotary embeddings, sibling projections and gated MLPs run fused for the duration of
    the call; see ``fused_norm``, ``fused_rotary`` and ``fused_linear``).

    Inputs are device views of the step's metadata (see ``step_builder``); the same code runs
    eagerly and under CUDA-graph capture, so it reads no tensor value on the host.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cache: PagedKVCache,
        round_tokens: torch.Tensor,
        selection: torch.Tensor,
        sel_count: torch.Tensor,
        page_table: SlotPageTable,
        use_triton: bool,
        score_block: int = 1,
    ) -> None:
        self.model, self.cache = model, cache
        self.round_tokens, self.selection, self.sel_count = round_tokens, selection, sel_count
        self.page_table = page_table
        self.use_triton = use_triton
        self.score_block = score_block  # granularity of verification scores, see StepContext
        # With the Triton kernels, the model's RMSNorms, rotary embeddings, projections and gated
        # MLPs run fused too (each verified against the model's own code first).
        self.fused = []
        if use_triton:
            norms = FusedNorms(model)
            # Norms swap first: the rotary function takes over the per-head ones, the decoder layers
            # those after a residual add (see fused_rotary, fused_residual).
            self.fused = [norms, FusedRotary(model, norms), FusedResiduals(model, norms), FusedLinears(model)]
        self.selection_mass = None  # a SelectionMass while a diagnostics run decodes
        self.nonfinite: torch.Tensor | None = None  # check_finite flags, see StepContext
        params = inspect.signature(model.forward).parameters
        # transformers renamed `past_key_values` to `cache` after 5.17; the old name warns there.
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.keeps_logits = "logits_to_keep" in params

    def forward(
        self,
        views: dict[str, torch.Tensor],
        scores: torch.Tensor | None,
        max_kv: int,
        fresh_prefill_rows: list[tuple[int, int]] | None = None,
        verification_only: bool = False,
        draft_only: bool = False,
    ) -> torch.Tensor:
        """float32 logits [len(logits_index), vocab]; verification rows write PillarAttn ``scores``."""
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
            score_block=self.score_block,
            selection_mass=self.selection_mass,
            fresh_prefill_rows=fresh_prefill_rows,
            verification_only=verification_only,
            draft_only=draft_only,
            verify_len=self.round_tokens.shape[1],
            nonfinite=self.nonfinite,
        )
        kwargs = {self.cache_kwarg: self.cache, "use_cache": True}
        if self.keeps_logits:
            kwargs["logits_to_keep"] = views["logits_index"]
        with step_context(context), ExitStack() as swaps:
            for fused in self.fused:
                swaps.enter_context(fused.swapped())
            out = self.model(input_ids=ids[None], position_ids=positions[None], **kwargs)
        logits = out.logits[0]
        if not self.keeps_logits:
            logits = logits[views["logits_index"]]
        if self.nonfinite is not None:
            self.nonfinite[-1] |= ~torch.isfinite(logits).all()
        return logits.float()
