"""Inputs SparseSpec cannot decode correctly are refused with an error that names the problem.

Unsupported generation modes (beam search, output_attentions, ...) are covered with the rest of the
call surface in test_surface_errors.py; this module covers padding and SparseSpec's own parameters.
"""

from __future__ import annotations

import pytest
import torch

from hf_sparsespec import NonFiniteError, SparseSpecConfig

from conftest import tiny_model

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 11, 12, 13, 14]])
LEFT_MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen3")


def generate(model, ids=IDS, mask=LEFT_MASK, **options):
    return model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, custom_generate="sparsespec", **options)


def test_left_padding_is_accepted(model):
    assert generate(model).shape == (2, 10)


@pytest.mark.parametrize(
    "mask",
    [
        torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),  # right padding
        torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1]]),  # a hole inside the prompt
    ],
    ids=["right padding", "hole"],
)
def test_padding_after_a_token_is_refused(model, mask):
    with pytest.raises(ValueError, match="left-padded.*padding_side = 'left'"):
        generate(model, mask=mask)
    assert model.config._attn_implementation == "sdpa"


def test_all_padding_row_is_refused(model):
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match="Row 1 of `input_ids` has no unpadded token"):
        generate(model, mask=mask)
    assert model.config._attn_implementation == "sdpa"


BAD_VALUES = [
    ("draft_len", 0),
    ("draft_len", 2.5),
    ("draft_len", True),
    ("selection", "foo"),
    ("budget_ratio", 2),
    ("budget_ratio", 0),
    ("min_budget", 0),
    ("max_budget", -1),
    ("page_size", 0),
    ("max_batch_size", 0),
    ("prefill_chunk", 0),
    ("kv_pool_tokens", 0),
    ("verify_groups", 0),
    ("kv_memory_fraction", 1.5),
    ("plain_tail", 1.0),
    ("plain_tail", -0.1),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES, ids=[f"{n}={v!r}" for n, v in BAD_VALUES])
def test_invalid_parameter_names_itself(model, name, value):
    with pytest.raises(ValueError, match=f"`{name}`"):
        SparseSpecConfig(**{name: value})
    with pytest.raises(ValueError, match=f"`{name}`"):
        generate(model, **{name: value})


def test_min_budget_above_max_budget(model):
    with pytest.raises(ValueError, match="`min_budget` \\(64\\) exceeds `max_budget` \\(32\\)"):
        generate(model, min_budget=64, max_budget=32)


def test_keywords_override_a_bundled_config(model):
    # Each alone is valid; the override must be checked together with the bundled values.
    with pytest.raises(ValueError, match="`min_budget` \\(16\\) exceeds `max_budget` \\(8\\)"):
        generate(model, sparsespec_config=SparseSpecConfig(min_budget=16, max_budget=32), max_budget=8)


def test_check_finite_passes_healthy_steps(model):
    # Padding tokens' outputs are never written; the check must look at real tokens only.
    torch.testing.assert_close(generate(model, check_finite=True), generate(model), rtol=0, atol=0)


def test_check_finite_names_the_first_bad_layer():
    poisoned = tiny_model("qwen3")
    with torch.no_grad():
        poisoned.model.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"first in layer 1's attention output in forward pass 1 .*Rows: request 0 prefill"):
        generate(poisoned, check_finite=True)


def test_padding_only_step_with_non_finite_logits_touches_only_the_dummy_slot(model, monkeypatch):
    # A CUDA graph's warm-up runs its bucket on padding alone: no token belongs to a row, the
    # kernels leave every attention output unwritten, and the logits are whatever that memory held
    # (NaN on the H200, where torch.multinomial's device assert then aborted batch-128 runs at 8k
    # and 16k). Such a step must neither fail nor change a real request's state.
    from hf_sparsespec.generation import engine as engine_module
    from hf_sparsespec.generation.step_builder import padding_values

    engines = []
    original = engine_module.Engine._launch
    monkeypatch.setattr(engine_module.Engine, "_launch", lambda self, rows: engines.append(self) or original(self, rows))
    model.generate(IDS, attention_mask=LEFT_MASK, max_new_tokens=4, do_sample=True, custom_generate="sparsespec")
    engine = engines[-1]
    vocab = engine.vocab_size
    monkeypatch.setattr(engine.runner, "forward", lambda views, *rest: torch.full((views["logits_index"].shape[0], vocab), float("nan")))
    pad = padding_values(engine.dummy_slot)
    views = {name: torch.full((1 if name.startswith("v_") else 8,), value, dtype=torch.long) for name, value in pad.items()}
    real = slice(0, engine.dummy_slot)
    before = engine.round_tokens[real].clone(), engine.draft_probs[real].clone()
    results, _, _ = engine._device_step(views, None, engine.max_kv)
    assert (results[:, 0] == 0).all()  # nothing accepted
    torch.testing.assert_close(engine.round_tokens[real], before[0], rtol=0, atol=0)
    torch.testing.assert_close(engine.draft_probs[real], before[1], rtol=0, atol=0)
