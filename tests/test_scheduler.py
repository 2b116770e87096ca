"""How the unified scheduler spreads verification rows over iterations."""

from __future__ import annotations

import pytest
import torch

import hf_sparsespec
from hf_sparsespec.generation import engine as engine_module
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
                   min_budget=4, draft_len=DRAFT_LEN, **options)
    # A round is k drafts, one verification and one iteration sat out while its result travels,
    # unless every request is waiting for one: then nothing is launched meanwhile.
    gaps = {b - a for steps in verifies.values() for a, b in zip(steps[:3], steps[1:3])}
    assert len(gaps) == 1 and gaps <= {DRAFT_LEN + 1, DRAFT_LEN + 2}, verifies
    cycle = gaps.pop()
    return {steps[0] % cycle for steps in verifies.values()}


@pytest.mark.parametrize(("options", "phases"), [
    (dict(), DRAFT_LEN + 1),
    (dict(verify_groups=2), 2),
    (dict(verify_groups=3), 3),
    (dict(verify_groups=99), DRAFT_LEN + 1),
    (dict(unified_schedule=False), 1),
])
def test_verifications_spread_over_the_requested_groups(monkeypatch, options, phases):
    assert len(verification_phases(monkeypatch, **options)) == phases
