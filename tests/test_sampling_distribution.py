"""Sampled SparseSpec output has transformers' own sampling distribution.

A tiny-vocabulary model makes the distribution of whole generations observable: thousands of
SparseSpec samples are compared with thousands of ``generate(do_sample=True)`` samples by chi-square
tests of homogeneity on every position and every pair of neighbouring positions. The draft attends
to one selected token out of ~30 and about half of its tokens are rejected, so the output is shaped
by rejection sampling; two deliberately broken verification rules must fail the same tests, which
shows they have the power to catch a broken sampler (measured: adjusted p-values of 1e-6 to 1e-8
for the subtler one, against the threshold of 1e-3).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

from hf_sparsespec.generation import engine as engine_module
from hf_sparsespec.generation.sampling import verify_drafts

from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 8
PROMPT_LEN = 24
NEW_TOKENS = 8
SAMPLES = 1500
ALPHA = 1e-3  # false-alarm rate of the whole family of tests of one comparison (Bonferroni)
MIN_CELL = 20  # categories seen fewer times than this (both samples together) are pooled into one

# Draft with one selected token besides the recent tail, so the draft really differs from the target.
SPARSE = dict(custom_generate="sparsespec", draft_len=2, min_budget=1, budget_ratio=0.01, max_batch_size=SAMPLES)

WARPERS = {
    "plain": dict(temperature=1.0, top_k=0, top_p=1.0),
    "temperature top-k top-p": dict(temperature=0.8, top_k=5, top_p=0.9),
}


@pytest.fixture(scope="module")
def model():
    model = tiny_model("llama", vocab_size=VOCAB, initializer_range=0.1)
    # tiny_model sharpens the logits 8x for greedy tests; mostly undo that, so that every step has real
    # entropy (about 1.3 of ln 8 = 2.1 nats) and draft and target overlap partially (total variation
    # about 0.45), where both accepting and resampling shape the output.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(0.25)
    model.generation_config.eos_token_id = None  # fixed-length samples: every position is observed
    return model


@pytest.fixture(scope="module")
def prompt():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, VOCAB, (1, PROMPT_LEN), generator=generator)


def hf_samples(model, prompt, warpers: dict, count: int, seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    out = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=True, num_return_sequences=count, **warpers)
    return out[:, PROMPT_LEN:].numpy()


def sparsespec_samples(model, prompt, warpers: dict, seed: int, **options) -> tuple[np.ndarray, dict]:
    torch.manual_seed(seed)
    out = model.generate(
        prompt, max_new_tokens=NEW_TOKENS, do_sample=True, num_return_sequences=SAMPLES,
        return_dict_in_generate=True, **warpers, **{**SPARSE, **options},
    )
    return out.sequences[:, PROMPT_LEN:].numpy(), out.spec_stats


def homogeneity_pvalue(a: np.ndarray, b: np.ndarray) -> float:
    """Chi-square test that two samples of categories (ints) come from one distribution."""
    cats, counts_a = np.unique(a, return_counts=True)
    table = {c: [n, 0] for c, n in zip(cats.tolist(), counts_a.tolist())}
    for c, n in zip(*np.unique(b, return_counts=True)):
        table.setdefault(int(c), [0, 0])[1] = int(n)
    rows = [v for v in table.values() if sum(v) >= MIN_CELL]
    rare = [v for v in table.values() if sum(v) < MIN_CELL]
    if rare:
        rows.append([sum(v[0] for v in rare), sum(v[1] for v in rare)])
    if len(rows) < 2:
        return 1.0
    return float(chi2_contingency(np.array(rows).T, correction=False)[1])


def smallest_adjusted_pvalue(reference: np.ndarray, samples: np.ndarray) -> float:
    """Bonferroni-adjusted p-value over each position and each pair of neighbouring positions."""
    pvalues = [homogeneity_pvalue(reference[:, t], samples[:, t]) for t in range(NEW_TOKENS)]
    pairs = lambda x, t: x[:, t] * VOCAB + x[:, t + 1]  # noqa: E731
    pvalues += [homogeneity_pvalue(pairs(reference, t), pairs(samples, t)) for t in range(NEW_TOKENS - 1)]
    return min(1.0, min(pvalues) * len(pvalues))


@pytest.fixture(scope="module")
def references(model, prompt):
    # Twice as many reference samples as SparseSpec samples: a cheap gain in power.
    return {name: hf_samples(model, prompt, warpers, 2 * SAMPLES, seed=1) for name, warpers in WARPERS.items()}


@pytest.mark.parametrize("warpers", WARPERS, ids=list(WARPERS))
def test_same_distribution_as_transformers(model, prompt, references, warpers):
    samples, stats = sparsespec_samples(model, prompt, WARPERS[warpers], seed=2)
    assert stats["acceptance_rate"] < 0.9, stats  # the draft disagrees: rejection sampling shapes the output
    assert smallest_adjusted_pvalue(references[warpers], samples) > ALPHA


def test_adaptive_draft_length_keeps_the_distribution(model, prompt, references):
    # Rounds start at 4 drafts (the prior) and shrink to about 2 at this acceptance, so verifications
    # of different lengths read a slot's draft probabilities left over from longer rounds.
    samples, stats = sparsespec_samples(model, prompt, WARPERS["plain"], seed=3, draft_len=4, adaptive_draft=True)
    assert 1 < stats["mean_draft_len"] < 4, stats
    assert smallest_adjusted_pvalue(references["plain"], samples) > ALPHA


def accept_every_draft(target_scores, draft_tokens, num_drafts, draft_probs, do_sample):
    """Broken: keeps all drafts, so the output is sampled from the draft distribution."""
    rows = torch.arange(num_drafts.shape[0])
    bonus = torch.softmax(target_scores[rows, num_drafts], dim=-1)
    return num_drafts.clone(), torch.multinomial(bonus, 1).squeeze(1)


def resample_without_residual(target_scores, draft_tokens, num_drafts, draft_probs, do_sample):
    """Broken: after a rejection, samples the target distribution instead of the residual max(p - q, 0)."""
    accepted, _ = verify_drafts(target_scores, draft_tokens, num_drafts, draft_probs, do_sample)
    rows = torch.arange(num_drafts.shape[0])
    return accepted, torch.multinomial(torch.softmax(target_scores[rows, accepted], dim=-1), 1).squeeze(1)


@pytest.mark.parametrize("broken_rule", [accept_every_draft, resample_without_residual], ids=lambda f: f.__name__)
def test_broken_verification_is_detected(model, prompt, references, broken_rule, monkeypatch):
    monkeypatch.setattr(engine_module, "verify_drafts", broken_rule)
    samples, _ = sparsespec_samples(model, prompt, WARPERS["plain"], seed=2)
    assert smallest_adjusted_pvalue(references["plain"], samples) < ALPHA
