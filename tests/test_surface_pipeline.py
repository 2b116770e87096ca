"""``pipeline("text-generation")`` with SparseSpec, per call and at construction."""

from __future__ import annotations

import pytest
from transformers import pipeline

import hf_sparsespec

from conftest import code_prompts

# The pipeline's own default samples; greedy has to be asked for to compare texts.
GREEDY = dict(do_sample=False, max_new_tokens=20)


@pytest.fixture(scope="module")
def prompts(bench_tokenizer):
    return code_prompts(bench_tokenizer, num_tokens=48, count=2)


@pytest.fixture(scope="module")
def plain_texts(bench_model, bench_tokenizer, prompts):
    generator = pipeline("text-generation", model=bench_model, tokenizer=bench_tokenizer)
    return [out[0]["generated_text"] for out in generator(prompts, **GREEDY)]


@pytest.mark.parametrize("strategy", ["sparsespec", hf_sparsespec.generate], ids=["name", "callable"])
def test_per_call(bench_model, bench_tokenizer, prompts, plain_texts, strategy, sparsespec_runs):
    generator = pipeline("text-generation", model=bench_model, tokenizer=bench_tokenizer)
    texts = [out[0]["generated_text"] for out in generator(prompts, custom_generate=strategy, **GREEDY)]
    assert texts == plain_texts
    assert len(sparsespec_runs) == len(prompts)


def test_at_construction_with_sparsespec_keywords(bench_model, bench_tokenizer, prompts, plain_texts, sparsespec_runs):
    generator = pipeline(
        "text-generation", model=bench_model, tokenizer=bench_tokenizer, custom_generate="sparsespec", draft_len=4, **GREEDY
    )
    texts = [generator(prompt)[0]["generated_text"] for prompt in prompts]
    assert texts == plain_texts
    assert len(sparsespec_runs) == len(prompts)
