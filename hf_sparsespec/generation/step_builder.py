"""Host-side description of one packed step, built with array operations instead of per-token Python.

At batch 128 the host has well under a millisecond per iteration before it becomes the bottleneck,
so only per-row scalars are read from Python objects; everything per token is derived with numpy.
Draft and verification tokens stay on the device: the step gathers them from the engine's per-slot
``round_tokens`` buffer (index ``slot * width + column``), and slots in the KV pool are looked up on
the device from the page table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import SparseSpecConfig
from .request import RowKind
from .scheduler import Row

PREFILL, DRAFT, VERIFY = 0, 1, 2


def unshifted_slot(dummy_slot: int) -> int:
    """Entry of the engine's per-slot commit counts that always holds 0: what rows placed by the
    host alone read (early drafts read their own slot's count, see ``build_step``)."""
    return dummy_slot + 1


def padding_values(dummy_slot: int) -> dict[str, int]:
    """What a padding entry holds: it writes no KV, attends to nothing, asks for no scores, and
    sends every sampled or verified token of its own to the dummy slot."""
    none = unshifted_slot(dummy_slot)
    return {
        "early_tok": none, "early_row": none, "early_pos": none,
        "ids_host": 0, "gather": -1, "positions": 0, "token_slot": -1, "logits_index": 0,
        "q_start": 0, "q_len": 0, "kv_len": 0, "is_draft": 0, "tail_start": 0, "sel_slot": 0, "score_row": -1,
        "single_pos": 0, "single_slot": dummy_slot, "single_col": 0, "single_prob_slot": dummy_slot, "single_commit": 0,
        "v_slot": dummy_slot, "v_num_drafts": 0, "v_start": 0, "v_old_len": 0, "v_count": 0,
        "hf_length": 0, "pos_slot": dummy_slot, "pos_extra": 0,
    }


@dataclass
class HostStep:
    """A packed step: model inputs (``inputs``) and the indices its post-processing needs (``post``)."""

    inputs: dict[str, np.ndarray]
    post: dict[str, np.ndarray]
    num_tokens: int
    num_logits: int
    max_kv_len: int
    has_prefill: bool
    commit_rows: list[int]  # rows whose tokens are committed by this step: ends of prefill, verifications
    commit_singles: list[int]  # for each committing end of prefill, its index among the sampled singles
    # Logits rows of each committed row's first token, and how many of its tokens may commit
    # (see ``commit_positions``).
    commit_starts: np.ndarray
    commit_lengths: np.ndarray
    fresh_prefill_rows: list[tuple[int, int]] | None  # (first token, length) when every row starts a prompt
    verification_only: bool  # every row verifies drafts (a lockstep round): query tiles may hold whole rows
    draft_only: bool  # every row is a sparse draft: attention need not split rows across programs

    def commit_positions(self) -> list[np.ndarray]:
        """Logits rows of each committed row's tokens, in ``commit_rows`` order. Built on demand: only ``output_scores`` / ``output_logits`` need them, and per
        row they would cost a third of a batch-128 step's host time."""
        return [start + np.arange(length) for start, length in zip(self.commit_starts.tolist(), self.commit_lengths.tolist())]


def build_step(
    rows: list[Row], config: SparseSpecConfig, prompt_width: int, sel_width: int, with_scores: bool, dummy_slot: int
) -> HostStep:
    """Describe one packed step. ``dummy_slot`` absorbs writes that have no real destination.

    An early draft (``Row.early``, the round's draft number ``c = early_drafts``) is placed ``c``
    positions past its request's last t0: the verification still in flight commits 1 to
    ``round_len + 1`` tokens before it, and the device adds that count (which it keeps per slot) to
    the row's positions, cache length and transformers-view length, read through the ``early_*``
    indices. Everything else about the row is known here: its input is the t0 that verification
    samples (or the early draft before it), its tail starts at the old t0, its selection is the one
    that verification makes.
    """
    width = config.draft_len + 1
    count = len(rows)
    kind = np.empty(count, np.int64)
    n = np.empty(count, np.int64)
    start = np.empty(count, np.int64)
    slot = np.empty(count, np.int64)
    col = np.zeros(count, np.int64)
    has_sel = np.zeros(count, np.int64)
    tail = np.empty(count, np.int64)
    done = np.empty(count, np.int64)  # tokens generated before the row
    needs = np.ones(count, bool)  # row produces logits
    round_len = np.zeros(count, np.int64)
    old_len = np.zeros(count, np.int64)
    plain = np.zeros(count, bool)  # verification rows of plain decoding: no scores, no selection
    early = np.zeros(count, bool)
    reach = np.zeros(count, np.int64)  # how far the device may still move the row
    prefill_ids = []
    for i, row in enumerate(rows):
        req = row.request
        n[i], slot[i], tail[i], done[i] = row.num_tokens, req.slot, req.tail_start, len(req.generated) + req.in_flight
        if row.kind is RowKind.PREFILL:
            kind[i], start[i] = PREFILL, req.prefilled
            prefill_ids.append((i, req.prompt[req.prefilled : req.prefilled + row.num_tokens]))
            needs[i] = req.prefilled + row.num_tokens == len(req.prompt)
        elif row.early:
            c = req.early_drafts
            kind[i], col[i], start[i], tail[i], has_sel[i] = DRAFT, c, req.num_cached + c, req.num_cached, 1
            early[i], reach[i] = True, req.round_len + 1
        elif row.kind is RowKind.DRAFT:
            kind[i], col[i], start[i] = DRAFT, req.drafted, req.num_cached + req.drafted
            has_sel[i] = req.has_selection
        else:
            kind[i], start[i] = VERIFY, req.num_cached
            round_len[i], old_len[i] = req.round_len, req.num_cached
            plain[i] = req.plain

    q_start = np.concatenate([[0], np.cumsum(n)[:-1]])
    total = int(n.sum())
    token_row = np.repeat(np.arange(count), n)
    offset = np.arange(total) - q_start[token_row]
    token_kind = kind[token_row]
    positions = start[token_row] + offset
    gather = np.where(token_kind == PREFILL, -1, slot[token_row] * width + col[token_row] + offset)
    ids_host = np.zeros(total, np.int64)
    for i, ids in prefill_ids:
        ids_host[q_start[i] : q_start[i] + len(ids)] = ids
    # Logits: every draft and verification token, and the last token of a finished prompt.
    wants = (token_kind != PREFILL) | (needs[token_row] & (offset == n[token_row] - 1))
    logits_index = np.nonzero(wants)[0]
    per_row = np.bincount(token_row[wants], minlength=count)
    logits_start = np.where(per_row > 0, np.concatenate([[0], np.cumsum(per_row)[:-1]]), -1)

    is_verify = kind == VERIFY
    # Score rows follow the verification rows' order, which is how the selection reads them.
    score_row = np.where(is_verify & with_scores & ~plain, np.cumsum(is_verify) - 1, -1)

    # Post-processing indices, per logits position and per row.
    pos_row = token_row[wants]
    pos_offset = offset[wants]
    pos_extra = np.where(kind[pos_row] == VERIFY, pos_offset, np.where(kind[pos_row] == DRAFT, col[pos_row], 0))
    single = (~is_verify) & needs  # drafts and ends of prefill: one sampled token each
    single_rows = np.nonzero(single)[0]
    single_is_draft = kind[single_rows] == DRAFT
    verify_rows = np.nonzero(is_verify)[0]
    v_count = np.minimum(
        np.maximum(config.min_budget, np.ceil(config.budget_ratio * old_len[verify_rows]).astype(np.int64)),
        np.minimum(config.max_budget, old_len[verify_rows]),
    )
    post = {
        "single_pos": logits_start[single_rows],
        "single_slot": slot[single_rows],
        "single_col": np.where(single_is_draft, col[single_rows] + 1, 0),
        "single_prob_slot": np.where(single_is_draft, slot[single_rows], dummy_slot),
        "single_commit": (~single_is_draft).astype(np.int64),
        "v_slot": slot[verify_rows],
        "v_num_drafts": round_len[verify_rows],
        "v_start": logits_start[verify_rows],
        "v_old_len": old_len[verify_rows],
        "v_count": np.where(plain[verify_rows], 0, np.minimum(v_count, sel_width)),
        "hf_length": prompt_width + done[pos_row] + pos_extra,
        "pos_slot": slot[pos_row],
        "pos_extra": pos_extra,
    }
    early_row = np.where(early, slot, unshifted_slot(dummy_slot))
    post["early_pos"] = early_row[pos_row]
    commit_single = single_rows[~single_is_draft]
    committing = np.concatenate([commit_single, verify_rows])
    inputs = {
        "ids_host": ids_host,
        "gather": gather,
        "positions": positions,
        "token_slot": slot[token_row],
        "logits_index": logits_index,
        "q_start": q_start,
        "q_len": n,
        "kv_len": start + n,
        "is_draft": has_sel * (kind == DRAFT),
        "tail_start": tail,
        "sel_slot": slot,
        "score_row": score_row,
        "early_tok": early_row[token_row],
        "early_row": early_row,
    }
    return HostStep(
        inputs=inputs,
        post=post,
        num_tokens=total,
        num_logits=len(logits_index),
        max_kv_len=int((start + n + reach).max()),
        has_prefill=bool((kind == PREFILL).any()),
        commit_rows=commit_single.tolist() + verify_rows.tolist(),
        commit_singles=np.nonzero(~single_is_draft)[0].tolist(),
        fresh_prefill_rows=(
            list(zip(q_start.tolist(), n.tolist())) if bool(((kind == PREFILL) & (start == 0)).all()) else None
        ),
        commit_starts=logits_start[committing],
        # A verification row commits up to all its tokens; an end of prefill one token.
        commit_lengths=np.where(kind[committing] == VERIFY, n[committing], 1),
        verification_only=bool(is_verify.all() and (round_len > 0).all()),
        draft_only=bool(((kind == DRAFT) & (has_sel > 0)).all()),
    )
