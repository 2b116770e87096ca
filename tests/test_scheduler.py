"""How the scheduler spreads verification rows over iterations and sizes each request's rounds."""

from __future__ import annotations

import pytest
import torch

import hf_sparsespec
from hf_sparsespec.generation import engine as engine_module
from hf_sparsespec.generation.draft_length import AcceptanceEstimate, best_draft_len, expected_tokens
from hf_sparsespec.generation.request import RowKind
from conftest import tiny_model

DRAFT_LEN = 4


def verification_phases(monkeypatch, **options) -> set[int]:
    """Iterations (mod the round's length) in which requests verify during their first rounds."""
    verifies: dict[int, list[int]] = {}
    original_launch = engine_module.Engine._launch
    step = {"n": 0}

    def launch(self, rows):
        for row in rows:
            if row.kind is RowKind.VERIFY:
                verifies.setdefault(row.request.index, []).append(step["n"])
        step["n"] += 1
        return original_launch(self, rows)

    monkeypatch.setattr(engine_module.Engine, "_launch", launch)
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (12, 20))
    model.generate(input_ids=ids, max_new_tokens=48, do_sample=False, custom_generate=hf_sparsespec.generate,
                   min_budget=4, draft_len=DRAFT_LEN, adaptive_draft=False, **options)
    # A round is k drafts and one verification: the next round's first draft runs while the
    # verification's result travels.
    gaps = {b - a for steps in verifies.values() for a, b in zip(steps[:3], steps[1:3])}
    assert gaps == {DRAFT_LEN + 1}, verifies
    return {steps[0] % (DRAFT_LEN + 1) for steps in verifies.values()}


@pytest.mark.parametrize(("options", "phases"), [
    (dict(), DRAFT_LEN + 1),
    (dict(verify_groups=2), 2),
    (dict(verify_groups=3), 3),
    (dict(verify_groups=99), DRAFT_LEN + 1),
    (dict(unified_schedule=False), 1),
])
def test_verifications_spread_over_the_requested_groups(monkeypatch, options, phases):
    assert len(verification_phases(monkeypatch, **options)) == phases


def test_acceptance_estimate_counts_only_checked_drafts():
    estimate = AcceptanceEstimate(accepted=0.0, checked=0.0)
    estimate.observe(accepted=3, drafted=8)  # 3 right, the 4th wrong, 5-8 never checked
    assert estimate.rate == pytest.approx(3 / 4)
    estimate.observe(accepted=8, drafted=8)  # all right: no rejection counted
    assert estimate.rate == pytest.approx((0.7 * 3 + 8) / (0.7 * 4 + 8))
    estimate.observe(accepted=0, drafted=0)  # a round without drafts tells nothing
    assert estimate.rate == pytest.approx((0.7 * 3 + 8) / (0.7 * 4 + 8))


def test_draft_length_grows_with_acceptance():
    lengths = [best_draft_len(rate, 16) for rate in (0.0, 0.3, 0.6, 0.8, 0.9, 0.95, 0.99, 1.0)]
    assert lengths == sorted(lengths) and lengths[0] == 1 and lengths[-1] == 16
    assert best_draft_len(0.99, 5) == 5 and best_draft_len(0.9, 0) == 0
    assert expected_tokens(3, 0.5) == pytest.approx(1 + 0.5 + 0.25 + 0.125)


def test_adaptive_rounds_are_short_where_drafts_fail_and_long_where_they_hold(bench_model, bench_tokenizer):
    # A random model's drafts are mostly rejected; the trained model's mostly accepted.
    ids = torch.randint(3, 256, (2, 24))
    options = dict(max_new_tokens=48, do_sample=False, custom_generate=hf_sparsespec.generate,
                   draft_len=8, adaptive_draft=True, return_dict_in_generate=True)
    random_stats = tiny_model("llama").generate(input_ids=ids, min_budget=4, **options).spec_stats
    code = bench_tokenizer(["def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n"], return_tensors="pt")
    trained_stats = bench_model.generate(**code, **{**options, "max_new_tokens": 96}).spec_stats
    assert random_stats["mean_draft_len"] < 3 < trained_stats["mean_draft_len"], (random_stats, trained_stats)


def test_thin_tail_rule_counts_live_requests_against_the_peak():
    from types import SimpleNamespace

    from hf_sparsespec.config import SparseSpecConfig
    from hf_sparsespec.generation.request import Request
    from hf_sparsespec.generation.scheduler import Scheduler

    def request(i):
        return Request(index=i, prompt=[1, 2], hf_prefix=torch.tensor([1, 2]), max_new_tokens=50, prefilled=2)

    # A pool with room for everything: admission is bounded by the 4 slots alone.
    roomy = SimpleNamespace(pages_for=lambda n: 1, allocator=SimpleNamespace(num_free=1 << 20))
    scheduler = Scheduler(SparseSpecConfig(plain_tail=0.5, unified_schedule=False), cache=roomy, num_slots=4)
    scheduler.add([request(i) for i in range(6)])
    scheduler._admit()
    assert len(scheduler.active) == 4 and len(scheduler.queue) == 2 and scheduler.peak_live == 4
    scheduler.queue.clear()  # the last two prompts were admitted and finished: a full batch of 4 remains
    scheduler.start_round(scheduler.active[0], first=False)
    assert scheduler.active[0].round_len == 8 and not scheduler.active[0].plain
    del scheduler.active[2:]  # two of four finished: the tail starts
    scheduler.start_round(scheduler.active[0], first=False)
    assert scheduler.active[0].round_len == 0 and scheduler.active[0].plain
    late = request(9)
    scheduler.queue.append(late)  # a waiting prompt refills the batch: no tail yet for the others
    scheduler.start_round(scheduler.active[1], first=False)
    assert scheduler.active[1].round_len == 8 and not scheduler.active[1].plain
    never = Scheduler(SparseSpecConfig(plain_tail=0.0), cache=roomy, num_slots=8)
    never.add([request(0)])
    never._admit()
    never.start_round(never.active[0], first=False)
    assert never.active[0].round_len == 8


@pytest.mark.parametrize("plain_tail", [0.0, 0.75])
def test_thin_tail_decodes_plainly_and_identically(bench_model, bench_tokenizer, monkeypatch, plain_tail):
    from conftest import code_prompts
    from test_greedy_equivalence import left_padded

    plain_rows = []
    original_launch = engine_module.Engine._launch

    def launch(self, rows):
        plain_rows.extend((row.kind, row.num_tokens) for row in rows if row.request.plain)
        return original_launch(self, rows)

    monkeypatch.setattr(engine_module.Engine, "_launch", launch)
    text = code_prompts(bench_tokenizer, 160, 4)
    rows = [bench_tokenizer(t).input_ids[:n] for t, n in zip(text, (160, 120, 80, 40))]
    ids, mask = left_padded(rows, pad=bench_tokenizer.pad_token_id)
    expected = bench_model.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False)
    out = bench_model.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False, draft_len=8, min_budget=16,
                               plain_tail=plain_tail, custom_generate=hf_sparsespec.generate, return_dict_in_generate=True)
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)
    stats = out.spec_stats
    if plain_tail:
        # Requests finish at different steps (their drafts are accepted at different rates); once at
        # most 3 of 4 are left, the rest verify one token per row and draft no more.
        assert stats["num_plain_steps"] > 0 and plain_rows
        assert set(plain_rows) == {(RowKind.VERIFY, 1)}
        assert stats["num_plain_steps"] == len(plain_rows)
    else:
        assert stats["num_plain_steps"] == 0 and not plain_rows
    assert stats["mean_accepted"] > 1  # over speculative rounds only


def _lockstep_step_marks(monkeypatch) -> list[tuple[set, set, bool, object]]:
    """(row kinds, row lengths, every row sparse, the built step) of each step of a lockstep generate."""
    marks = []
    original = engine_module.build_step

    def build_step(rows, *args, **kwargs):
        step = original(rows, *args, **kwargs)
        marks.append(({row.kind for row in rows}, {row.num_tokens for row in rows},
                      all(row.early or row.request.has_selection for row in rows), step))
        return step

    monkeypatch.setattr(engine_module, "build_step", build_step)
    ids = torch.randint(3, 256, (4, 20))
    tiny_model("llama").generate(input_ids=ids, max_new_tokens=30, do_sample=False, custom_generate=hf_sparsespec.generate,
                                 min_budget=4, draft_len=DRAFT_LEN, unified_schedule=False, plain_tail=0.0)
    return marks


def test_only_lockstep_verification_steps_are_marked_verification_only(monkeypatch):
    marks = _lockstep_step_marks(monkeypatch)
    assert any(step.verification_only for *_, step in marks)
    for kinds, sizes, _, step in marks:
        assert step.verification_only == (kinds == {RowKind.VERIFY} and min(sizes) > 1), (kinds, sizes)


def test_only_steps_of_sparse_drafts_are_marked_draft_only(monkeypatch):
    marks = _lockstep_step_marks(monkeypatch)
    assert any(step.draft_only for *_, step in marks)
    # The first round's drafts come before any verification: full rows, not draft-only steps.
    assert any(kinds == {RowKind.DRAFT} and not step.draft_only for kinds, _, _, step in marks)
    for kinds, _, sparse, step in marks:
        assert step.draft_only == (kinds == {RowKind.DRAFT} and sparse), (kinds, sparse)


@pytest.mark.parametrize("in_flight", [2, 3])
def test_early_drafts_change_no_draft_and_shorten_rounds(bench_model, bench_tokenizer, monkeypatch, in_flight):
    # Lockstep rounds without a thin tail have the same rounds either way, so a draft launched
    # before its verification's result is read must be the draft launched after it: a misplaced
    # one (wrong position, tail or selection) would change which drafts are accepted. With three
    # iterations in flight (every result read as late as possible), a request runs two early drafts.
    from conftest import code_prompts

    text = code_prompts(bench_tokenizer, 200, 3)
    ids = torch.tensor([bench_tokenizer(t).input_ids[:200] for t in text])
    early_columns = []
    original_launch = engine_module.Engine._launch

    def launch(self, rows):
        early_columns.extend(row.request.early_drafts for row in rows if row.early)
        return original_launch(self, rows)

    def generate(early: bool, **options):
        monkeypatch.setattr(engine_module.Engine, "EARLY_DRAFTS", early)
        early_columns.clear()
        out = bench_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=80, do_sample=False,
                                   eos_token_id=None, draft_len=6, min_budget=16, plain_tail=0.0,
                                   custom_generate=hf_sparsespec.generate, return_dict_in_generate=True, **options)
        return out, list(early_columns)

    monkeypatch.setattr(engine_module.Engine, "_launch", launch)
    monkeypatch.setattr(engine_module.Engine, "IN_FLIGHT", in_flight)
    if in_flight > 2:
        monkeypatch.setattr(engine_module.StepResults, "ready", lambda self: False)
    (late, none), (early, columns) = generate(False, unified_schedule=False), generate(True, unified_schedule=False)
    torch.testing.assert_close(early.sequences, late.sequences, rtol=0, atol=0)
    late, early = late.spec_stats, early.spec_stats
    assert early["mean_accepted_per_sequence"] == late["mean_accepted_per_sequence"]
    assert early["num_draft_steps"] == late["num_draft_steps"] and early["num_verify_steps"] == late["num_verify_steps"]
    assert early["mean_accepted"] > 2  # real drafts were compared, not rejections alone
    # Every verification but those of the last few rounds (no room left for a round after it) was
    # followed by in_flight - 1 early drafts.
    assert not none and set(columns) == set(range(in_flight - 1))
    assert late["num_verify_steps"] - 3 * 3 <= columns.count(0) < late["num_verify_steps"]
    # In the unified schedule the iterations a request sat out held other requests' rows: without
    # them a round is shorter, so the same tokens take fewer forwards.
    (late, _), (early, columns) = generate(False), generate(True)
    torch.testing.assert_close(early.sequences, late.sequences, rtol=0, atol=0)
    assert columns and early.spec_stats["num_forward_passes"] < 0.95 * late.spec_stats["num_forward_passes"]
