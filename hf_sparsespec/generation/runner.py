"""Turns planned rows into one packed forward of the unmodified HF model."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from ..attention.context import StepContext, step_context
from ..cache.paged_cache import PagedKVCache
from .request import RowKind
from .scheduler import Row


@dataclass
class PackedStep:
    """A packed batch: tokens of all rows back to back, and which positions need logits."""

    input_ids: torch.Tensor  # [T]
    position_ids: torch.Tensor  # [T]
    context: StepContext
    logits_index: torch.Tensor  # [N] packed token index of every position whose logits are used
    logits_start: list[int]  # per row: its first entry in logits_index (-1 when the row needs none)


class StepBuilder:
    """Builds the step's inputs and attention metadata on the host, then moves them in one copy each.

    Draft and verification tokens are not known on the host (they were sampled on the device); the
    inputs gather them from the engine's per-slot ``round_tokens`` buffer instead.
    """

    def __init__(self, cache: PagedKVCache, round_tokens: torch.Tensor, selection: torch.Tensor, sel_count: torch.Tensor):
        self.cache = cache
        self.round_tokens = round_tokens  # [S, k+1] on the device
        self.selection = selection
        self.sel_count = sel_count

    def build(self, rows: list[Row], with_scores: bool, use_triton: bool) -> PackedStep:
        device = self.cache.device
        width = self.round_tokens.shape[1]
        host_ids, gather, positions, slots = [], [], [], []
        q_start, q_len, kv_len, is_draft, tail_start, sel_slot, score_row = [], [], [], [], [], [], []
        logits_index, logits_start = [], []
        num_tokens = num_scores = 0
        for row in rows:
            req, n = row.request, row.num_tokens
            if row.kind is RowKind.PREFILL:
                start = req.prefilled
                host_ids.extend(req.prompt[start : start + n])
                gather.extend([-1] * n)
                needs_logits = start + n == len(req.prompt)
                first_logit = num_tokens + n - 1
            else:
                start = req.num_cached + (req.drafted if row.kind is RowKind.DRAFT else 0)
                first_col = req.drafted if row.kind is RowKind.DRAFT else 0
                host_ids.extend([0] * n)
                gather.extend(req.slot * width + first_col + j for j in range(n))
                needs_logits = True
                first_logit = num_tokens
            pos = torch.arange(start, start + n)
            positions.append(pos)
            slots.append(self.cache.slots(req.index, pos))
            logits_start.append(len(logits_index) if needs_logits else -1)
            if needs_logits:
                last = num_tokens + n if row.kind is RowKind.VERIFY else first_logit + 1
                logits_index.extend(range(first_logit, last))
            q_start.append(num_tokens)
            q_len.append(n)
            kv_len.append(start + n)
            is_draft.append(row.kind is RowKind.DRAFT and req.has_selection)
            tail_start.append(req.tail_start)
            sel_slot.append(req.slot)
            if row.kind is RowKind.VERIFY and with_scores:
                score_row.append(num_scores)
                num_scores += 1
            else:
                score_row.append(-1)
            num_tokens += n

        max_pages = max(len(self.cache.pages(row.request.index)) for row in rows)
        block_tables = self.cache.block_table([row.request.index for row in rows], max_pages)
        max_kv = max(kv_len)
        scores = None
        if num_scores:
            scores = torch.zeros(
                num_scores, self.cache.num_layers, self.cache.num_kv_heads, max_kv, dtype=torch.float32, device=device
            )
        gather_t = torch.tensor(gather, dtype=torch.long).to(device)
        ids = torch.tensor(host_ids, dtype=torch.long).to(device)
        ids = torch.where(gather_t >= 0, self.round_tokens.view(-1)[gather_t.clamp(min=0)], ids)

        def on_device(values, dtype=torch.int32):
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        context = StepContext(
            cache=self.cache,
            slot_mapping=torch.cat(slots).to(device),
            q_start=on_device(q_start),
            q_len=on_device(q_len),
            kv_len=on_device(kv_len),
            block_tables=block_tables.to(device),
            is_draft=on_device(is_draft, torch.bool),
            tail_start=on_device(tail_start),
            sel_slot=on_device(sel_slot, torch.long),
            selection=self.selection,
            sel_count=self.sel_count,
            score_row=on_device(score_row, torch.long),
            scores=scores,
            max_kv_len=max_kv,
            use_triton=use_triton,
        )
        return PackedStep(
            input_ids=ids,
            position_ids=torch.cat(positions).to(device),
            context=context,
            logits_index=on_device(logits_index, torch.long),
            logits_start=logits_start,
        )


class ModelRunner:
    """Calls the HF model on a packed step with our cache, under either transformers cache kwarg name."""

    def __init__(self, model: torch.nn.Module, cache: PagedKVCache) -> None:
        self.model = model
        self.cache = cache
        params = inspect.signature(model.forward).parameters
        # transformers renamed `past_key_values` to `cache` after 5.17; the old name warns there.
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.keeps_logits = "logits_to_keep" in params

    def forward(self, step: PackedStep) -> torch.Tensor:
        """float32 logits [N, vocab] at ``step.logits_index``."""
        kwargs = {self.cache_kwarg: self.cache, "use_cache": True}
        if self.keeps_logits:
            kwargs["logits_to_keep"] = step.logits_index
        with step_context(step.context):
            out = self.model(input_ids=step.input_ids[None], position_ids=step.position_ids[None], **kwargs)
        logits = out.logits[0]
        if not self.keeps_logits:
            logits = logits[step.logits_index]
        return logits.float()
