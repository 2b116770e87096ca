"""transformers' logits processors under SparseSpec: applied with transformers' semantics, or refused by name.

A packed step scores positions of many requests at many lengths, so the processors are applied over
per-position state rather than over one ``input_ids`` batch. Deterministic settings are compared
token for token with plain ``generate``; for sampling warpers, the processed scores SparseSpec
sampled from are compared with the scores transformers computes for the same prefixes.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from conftest import tiny_model
from test_greedy_equivalence import random_prompts

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = dict(custom_generate="sparsespec", draft_len=4, min_budget=4)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def prompts():
    return random_prompts((33, 18, 9), seed=4)


# Plain decoding runs rows whose tokens the host has not read yet, so length-dependent processors
# must count those tokens too.
ENGINES = {"speculative": {}, "plain decoding": dict(speculate=False)}


def both(model, ids, mask, engine: dict | None = None, **options):
    """(transformers, SparseSpec) outputs of the same call, as dict outputs with processed scores."""
    common = dict(attention_mask=mask, return_dict_in_generate=True, output_scores=True, **options)
    return model.generate(ids, **common), model.generate(ids, **common, **SPEC, **(engine or {}))


def assert_same_greedy(expected, out):
    torch.testing.assert_close(out.sequences, expected.sequences, rtol=0, atol=0)
    assert len(out.scores) == len(expected.scores)
    for theirs, ours in zip(expected.scores, out.scores):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("engine", ENGINES, ids=list(ENGINES))
@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_greedy(llama, prompts, penalty, engine):
    ids, mask = prompts
    expected, out = both(llama, ids, mask, ENGINES[engine], max_new_tokens=40, do_sample=False, repetition_penalty=penalty)
    assert_same_greedy(expected, out)
    plain = llama.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    assert not torch.equal(plain, expected.sequences)  # the penalty changes this output, so it was applied


def early_token(model, ids, mask) -> int:
    """A token that greedy decoding produces within the first three new tokens of some row."""
    free = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, eos_token_id=None)
    return Counter(t for t in free[:, ids.shape[1] :].flatten().tolist() if t > 2).most_common(1)[0][0]


@pytest.mark.parametrize("engine", ENGINES, ids=list(ENGINES))
@pytest.mark.parametrize("minimum", ["min_new_tokens", "min_length"])
def test_minimum_length_greedy(llama, prompts, minimum, engine):
    ids, mask = prompts
    eos = early_token(llama, ids, mask)
    value = 12 if minimum == "min_new_tokens" else ids.shape[1] + 12
    options = dict(max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=0)
    expected, out = both(llama, ids, mask, ENGINES[engine], **options, **{minimum: value})
    assert_same_greedy(expected, out)
    unconstrained = llama.generate(ids, attention_mask=mask, **options)
    assert not torch.equal(unconstrained, expected.sequences)  # EOS came early without the minimum


WARPERS = {
    "temperature": dict(temperature=0.6),
    "top-k": dict(top_k=5),
    "top-p": dict(top_p=0.8),
    "min-p": dict(min_p=0.1),
    "typical": dict(typical_p=0.7),
    "epsilon": dict(epsilon_cutoff=3e-2),
    "all of temperature, top-k, top-p, min-p": dict(temperature=1.5, top_k=20, top_p=0.9, min_p=0.05),
}


@pytest.mark.parametrize("warpers", WARPERS, ids=list(WARPERS))
def test_sampling_warpers_score_like_transformers(llama, prompts, warpers):
    ids, mask = prompts
    options = dict(do_sample=True, eos_token_id=None, **WARPERS[warpers])
    torch.manual_seed(0)
    out = llama.generate(
        ids, attention_mask=mask, max_new_tokens=16, return_dict_in_generate=True, output_scores=True, **options, **SPEC
    )
    width = ids.shape[1]
    filtered = 0
    for t, ours in enumerate(out.scores):
        prefix = out.sequences[:, : width + t]
        prefix_mask = torch.cat([mask, torch.ones(len(ids), t, dtype=mask.dtype)], dim=1)
        theirs = llama.generate(
            prefix, attention_mask=prefix_mask, max_new_tokens=1, return_dict_in_generate=True, output_scores=True, **options
        ).scores[0]
        torch.testing.assert_close(ours.isinf(), theirs.isinf())
        torch.testing.assert_close(ours.masked_fill(ours.isinf(), 0), theirs.masked_fill(theirs.isinf(), 0), rtol=1e-4, atol=1e-4)
        filtered += int(theirs.isinf().sum())
    if warpers != "temperature":
        assert filtered > 0  # the warper did remove tokens, so a warper left out would have shown


UNSUPPORTED = {
    "no_repeat_ngram_size": (dict(no_repeat_ngram_size=2), "NoRepeatNGramLogitsProcessor"),
    "bad_words_ids": (dict(bad_words_ids=[[5], [7, 8]]), "NoBadWordsLogitsProcessor"),
    "sequence_bias": (dict(sequence_bias={(5,): -2.0}), "SequenceBiasLogitsProcessor"),
    "exponential_decay_length_penalty": (
        dict(exponential_decay_length_penalty=(4, 1.5)),
        "ExponentialDecayLengthPenalty",
    ),
    "forced_eos_token_id": (dict(forced_eos_token_id=2), "ForcedEOSTokenLogitsProcessor"),
    "begin_suppress_tokens": (dict(begin_suppress_tokens=[5]), "SuppressTokensAtBeginLogitsProcessor"),
}


@pytest.mark.parametrize("option", UNSUPPORTED, ids=list(UNSUPPORTED))
def test_unsupported_processor_is_refused_by_name(llama, prompts, option):
    ids, mask = prompts
    options, name = UNSUPPORTED[option]
    with pytest.raises(NotImplementedError, match=name):
        llama.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, **options, **SPEC)
    assert llama.config._attn_implementation == "sdpa"


class BanToken(LogitsProcessor):
    def __call__(self, input_ids, scores):
        return scores.index_fill(1, torch.tensor([5]), float("-inf"))


def test_user_processor_is_refused_by_name(llama, prompts):
    ids, mask = prompts
    with pytest.raises(NotImplementedError, match="BanToken"):
        llama.generate(
            ids, attention_mask=mask, max_new_tokens=8, do_sample=False, logits_processor=LogitsProcessorList([BanToken()]), **SPEC
        )
