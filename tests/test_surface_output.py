"""``return_dict_in_generate=True``: a ``SparseSpecOutput`` shaped like transformers' own, plus ``spec_stats``."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation import GenerateDecoderOnlyOutput

from hf_sparsespec import SparseSpecOutput

from conftest import tiny_model

NEW_TOKENS = 20
VOCAB = 256


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab_size=VOCAB)


@pytest.fixture(scope="module")
def batch():
    ids = torch.tensor([[0, 0, 0, 1, 5, 6, 7], [1, 9, 10, 11, 12, 13, 14]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def _generate(model, batch, **kwargs):
    return model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, **kwargs)


def test_scores_and_logits_match_plain_greedy(model, batch):
    plain = _generate(model, batch, output_scores=True, output_logits=True)
    out = _generate(model, batch, output_scores=True, output_logits=True, custom_generate="sparsespec", draft_len=4)
    assert isinstance(out, SparseSpecOutput) and isinstance(out, GenerateDecoderOnlyOutput)
    assert torch.equal(out.sequences, plain.sequences)
    prompt = batch["input_ids"].shape[1]
    assert out.sequences.shape == (2, prompt + NEW_TOKENS)
    for name in ("scores", "logits"):
        steps = getattr(out, name)
        assert len(steps) == NEW_TOKENS
        assert all(step.shape == (2, VOCAB) for step in steps)
        torch.testing.assert_close(torch.stack(steps), torch.stack(getattr(plain, name)), atol=1e-4, rtol=1e-4)
    argmax = torch.stack(out.scores, dim=1).argmax(-1)
    assert torch.equal(argmax, out.sequences[:, prompt:])


def test_without_scores(model, batch):
    out = _generate(model, batch, custom_generate="sparsespec")
    assert out.scores is None and out.logits is None
    assert out.attentions is None and out.hidden_states is None


def test_spec_stats(model, batch):
    out = _generate(model, batch, custom_generate="sparsespec", draft_len=4)
    stats = out.spec_stats
    assert stats["new_tokens"] == 2 * NEW_TOKENS
    assert stats["num_verify_steps"] >= 1
    assert stats["num_draft_steps"] <= 4 * stats["num_verify_steps"]
    assert 0.0 <= stats["mean_accepted"] <= 4
    assert 0.0 <= stats["acceptance_rate"] <= 1.0
    per_sequence = stats["mean_accepted_per_sequence"]
    assert len(per_sequence) == 2 and all(0.0 <= m <= 4 for m in per_sequence)
    # The batch's mean weighs each sequence by its rounds, so it lies between theirs.
    assert min(per_sequence) - 1e-9 <= stats["mean_accepted"] <= max(per_sequence) + 1e-9
    assert math.isfinite(stats["tokens_per_s"]) and stats["tokens_per_s"] > 0


def test_plain_tensor_without_return_dict(model, batch):
    plain = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, custom_generate="sparsespec")
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out, plain)
