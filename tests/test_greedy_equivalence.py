"""Greedy SparseSpec output is token-identical to transformers' own greedy ``generate`` (sdpa, float32).

Every comparison uses a small ``min_budget`` and contexts several times longer, so drafts run on a
real subset of the context and are rejected often: the corrections, not just the drafts, make the
output. Prompts of mixed lengths exercise left padding.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from hf_sparsespec.generation import engine as engine_module

from conftest import code_prompts, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = dict(custom_generate="sparsespec", return_dict_in_generate=True)


def left_padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def random_prompts(lengths: tuple[int, ...], vocab: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # Ids from 3 up: no prompt token is the pad, BOS or EOS id of the tiny models.
    return left_padded([torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths])


def assert_drafts_disagreed(stats: dict) -> None:
    """Drafts must be partly accepted and partly rejected, or the comparison tests too little."""
    assert 0 < stats["acceptance_rate"] < 1, stats


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def five_prompts():
    return random_prompts((41, 23, 7, 30, 15), seed=1)


@pytest.fixture(scope="module")
def llama_reference(llama, five_prompts):
    ids, mask = five_prompts
    return llama.generate(ids, attention_mask=mask, max_new_tokens=48, do_sample=False)


@pytest.mark.parametrize("draft_len", [4, 8])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_tiny_architectures(arch, draft_len):
    model = tiny_model(arch)
    ids, mask = random_prompts((37, 20, 6))
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False, draft_len=draft_len, min_budget=4, **SPEC)
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)
    assert_drafts_disagreed(out.spec_stats)


@pytest.mark.parametrize("draft_len", [4, 8])
def test_bench_model_on_code(bench_model, bench_tokenizer, draft_len):
    text = code_prompts(bench_tokenizer, 160, 3)
    rows = [bench_tokenizer(t).input_ids[:n] for t, n in zip(text, (160, 110, 60))]
    ids, mask = left_padded(rows, pad=bench_tokenizer.pad_token_id)
    expected = bench_model.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False)
    out = bench_model.generate(
        ids, attention_mask=mask, max_new_tokens=64, do_sample=False, draft_len=draft_len, min_budget=16, **SPEC
    )
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)
    assert_drafts_disagreed(out.spec_stats)
    assert out.spec_stats["mean_accepted"] > 1  # a trained model's sparse draft is mostly right


ENGINE_VARIANTS = {
    "no speculation": dict(speculate=False),
    "plain schedule": dict(unified_schedule=False),
    "two verification groups": dict(verify_groups=2),
    "no delayed verification": dict(delayed_verification=False),
    "neither scheduler feature": dict(unified_schedule=False, delayed_verification=False),
    "page size 1": dict(page_size=1),
    "page size 16": dict(page_size=16),
    "two slots for five prompts": dict(max_batch_size=2),
    "prompts prefilled in chunks": dict(prefill_chunk=8, max_batch_size=3),
    "paper selection": dict(selection="paper"),
    "window selection": dict(selection="window"),
    "block-score selection": dict(selection="pillar_block"),
    "one draft per round": dict(draft_len=1),
    "adaptive draft length": dict(adaptive_draft=True),
    "budget from the ratio": dict(min_budget=1, budget_ratio=0.2),
}


@pytest.mark.parametrize("variant", ENGINE_VARIANTS, ids=list(ENGINE_VARIANTS))
def test_engine_variants(llama, five_prompts, llama_reference, variant):
    ids, mask = five_prompts
    options = {"draft_len": 4, "min_budget": 4, **ENGINE_VARIANTS[variant]}
    out = llama.generate(ids, attention_mask=mask, max_new_tokens=48, do_sample=False, **options, **SPEC)
    torch.testing.assert_close(out.sequences, llama_reference, rtol=0, atol=0)
    if options.get("speculate", True):
        assert_drafts_disagreed(out.spec_stats)
    else:
        assert out.spec_stats["num_draft_steps"] == 0


def test_num_return_sequences(llama, five_prompts):
    # Sampling restricted to the top token is deterministic, and lets transformers expand the batch.
    ids, mask = five_prompts
    options = dict(attention_mask=mask, max_new_tokens=32, do_sample=True, top_k=1, num_return_sequences=3)
    expected = llama.generate(ids, **options)
    out = llama.generate(ids, draft_len=4, min_budget=4, **options, **SPEC)
    assert out.sequences.shape[0] == 15
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)


def frequent_mid_generation_token(sequences: torch.Tensor, width: int, start: int, stop: int) -> int:
    """The token produced most often between new positions ``start`` and ``stop`` (not a special id)."""
    counts = Counter(t for t in sequences[:, width + start : width + stop].flatten().tolist() if t > 2)
    return counts.most_common(1)[0][0]


def test_eos_inside_accepted_drafts(llama, five_prompts, monkeypatch):
    ids, mask = five_prompts
    free = llama.generate(ids, attention_mask=mask, max_new_tokens=48, do_sample=False, eos_token_id=None)
    eos = frequent_mid_generation_token(free, ids.shape[1], 4, 40)
    expected = llama.generate(ids, attention_mask=mask, max_new_tokens=48, do_sample=False, eos_token_id=eos, pad_token_id=0)

    commits = []
    original = engine_module.Engine._commit

    def recording_commit(self, req, tokens, *args, **kwargs):
        commits.append(list(tokens))
        return original(self, req, tokens, *args, **kwargs)

    monkeypatch.setattr(engine_module.Engine, "_commit", recording_commit)
    out = llama.generate(
        ids, attention_mask=mask, max_new_tokens=48, do_sample=False, eos_token_id=eos, pad_token_id=0,
        draft_len=4, min_budget=16, **SPEC,
    )
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)
    # The case under test: an accepted draft was EOS and the tokens verified after it were dropped.
    assert any(eos in tokens[:-1] for tokens in commits)
    stop_points = {int((row[ids.shape[1] :] == eos).nonzero()[0]) for row in expected if (row[ids.shape[1] :] == eos).any()}
    assert len(stop_points) >= 2  # rows ended at different steps, so padding after EOS was compared


def test_prompts_prefill_through_fused_attention(llama, five_prompts, llama_reference, monkeypatch):
    # A step of nothing but prompts' first chunks skips the paged path (whose per-row reference
    # materialises [H, T, T] scores: tens of gigabytes for 16k prompts on the CPU).
    from hf_sparsespec.attention import interface

    calls = []
    original = interface.fresh_prefill_attention

    def counting(query, *args):
        calls.append(query.shape[2])
        return original(query, *args)

    monkeypatch.setattr(interface, "fresh_prefill_attention", counting)
    ids, mask = five_prompts
    out = llama.generate(ids, attention_mask=mask, max_new_tokens=48, do_sample=False, draft_len=4, min_budget=4, **SPEC)
    torch.testing.assert_close(out.sequences, llama_reference, rtol=0, atol=0)
    assert sum(calls) == int(mask.sum()) * llama.config.num_hidden_layers  # every prompt token, once per layer


def test_max_length_and_max_new_tokens(llama, five_prompts):
    ids, mask = five_prompts
    by_length = llama.generate(ids, attention_mask=mask, max_length=ids.shape[1] + 21, do_sample=False, draft_len=4, min_budget=4, **SPEC)
    by_new = llama.generate(ids, attention_mask=mask, max_new_tokens=21, do_sample=False, draft_len=4, min_budget=4, **SPEC)
    expected = llama.generate(ids, attention_mask=mask, max_length=ids.shape[1] + 21, do_sample=False)
    assert expected.shape[1] == ids.shape[1] + 21
    torch.testing.assert_close(by_length.sequences, expected, rtol=0, atol=0)
    torch.testing.assert_close(by_new.sequences, expected, rtol=0, atol=0)


class StopAtToken(StoppingCriteria):
    """Stops each row, separately, once its latest token is ``token`` (or one of a set of tokens)."""

    def __init__(self, token: int | set[int]) -> None:
        self.tokens = torch.tensor(sorted(token) if isinstance(token, set) else [token])

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.isin(input_ids[:, -1], self.tokens.to(input_ids.device))


def test_custom_stopping_criterion(llama, five_prompts, llama_reference):
    ids, mask = five_prompts
    stop = frequent_mid_generation_token(llama_reference, ids.shape[1], 4, 40)
    criteria = StoppingCriteriaList([StopAtToken(stop)])
    expected = llama.generate(ids, attention_mask=mask, max_new_tokens=48, do_sample=False, stopping_criteria=criteria)
    out = llama.generate(
        ids, attention_mask=mask, max_new_tokens=48, do_sample=False, stopping_criteria=criteria, draft_len=4, min_budget=4, **SPEC
    )
    assert not torch.equal(expected, llama_reference)  # the criterion stopped rows, and padding followed
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)


def test_custom_stopping_criterion_without_eos(llama, five_prompts):
    # Without an end-of-sequence token transformers does not pad stopped rows: they decode on until
    # every row has been stopped once, and all rows end at that step.
    ids, mask = five_prompts
    free = llama.generate(ids, attention_mask=mask, max_new_tokens=48, do_sample=False, eos_token_id=None)
    # Row b's token at new position 4 + 3b stops it there at the latest, so rows stop at different steps.
    stops = {int(free[b, ids.shape[1] + 4 + 3 * b]) for b in range(ids.shape[0])}
    criteria = StoppingCriteriaList([StopAtToken(stops)])
    kwargs = dict(attention_mask=mask, max_new_tokens=48, do_sample=False, stopping_criteria=criteria, eos_token_id=None, pad_token_id=0)
    expected = llama.generate(ids, **kwargs)
    out = llama.generate(ids, **kwargs, draft_len=4, min_budget=4, **SPEC)
    new = expected.shape[1] - ids.shape[1]
    assert 0 < new < 48  # the criterion ended the call early
    assert torch.equal(expected, free[:, : expected.shape[1]])  # with real tokens after each row's own stop
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)


class FailOnCall(StoppingCriteria):
    def __init__(self, when: int) -> None:
        self.calls, self.when = 0, when

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.when:
            raise RuntimeError("criterion failed on purpose")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_attention_implementation_restored(llama, five_prompts, llama_reference):
    ids, mask = five_prompts
    llama.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, draft_len=4, **SPEC)
    assert llama.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="on purpose"):
        llama.generate(
            ids, attention_mask=mask, max_new_tokens=48, do_sample=False, draft_len=4, min_budget=4,
            stopping_criteria=StoppingCriteriaList([FailOnCall(when=30)]), **SPEC,
        )
    assert llama.config._attn_implementation == "sdpa"
    # The failed call must leave neither the model nor the cached engine in a broken state.
    torch.testing.assert_close(llama.generate(ids, attention_mask=mask, max_new_tokens=48, do_sample=False), llama_reference)
    out = llama.generate(ids, attention_mask=mask, max_new_tokens=48, do_sample=False, draft_len=4, min_budget=4, **SPEC)
    torch.testing.assert_close(out.sequences, llama_reference, rtol=0, atol=0)
