"""A KV pool too small for the batch: requests move to host memory and back without changing a token.

Five greedy requests that need up to ~80 tokens of KV each share a pool of about 100 tokens, so the
scheduler must offload some while others run, and restore them later.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from test_greedy_equivalence import random_prompts

pytestmark = pytest.mark.usefixtures("one_thread")

NEW_TOKENS = 40
SPEC = dict(custom_generate="sparsespec", return_dict_in_generate=True, do_sample=False, draft_len=4, min_budget=4)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def prompts():
    return random_prompts((30, 25, 34, 20, 28), seed=3)


@pytest.fixture(scope="module")
def unconstrained(llama, prompts):
    ids, mask = prompts
    out = llama.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, **SPEC)
    assert out.spec_stats["num_offloads"] == 0
    # Also pinned to transformers, so that a bug shared by both SparseSpec runs cannot hide.
    expected = llama.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)
    return out.sequences


SMALL_POOLS = {
    "pages of 4": dict(page_size=4, kv_pool_tokens=96),
    "pages of 16": dict(page_size=16, kv_pool_tokens=160),
    "pages of 1": dict(page_size=1, kv_pool_tokens=100),
    "chunked prefill": dict(page_size=4, kv_pool_tokens=96, prefill_chunk=8),
    "three slots": dict(page_size=4, kv_pool_tokens=96, max_batch_size=3),
    "plain schedule, no delayed verification": dict(
        page_size=4, kv_pool_tokens=96, unified_schedule=False, delayed_verification=False
    ),
    # Plain decoding keeps rows in flight, so a request can be offloaded with a token not yet read.
    "no speculation": dict(page_size=4, kv_pool_tokens=96, speculate=False),
}


@pytest.mark.parametrize("pool", SMALL_POOLS, ids=list(SMALL_POOLS))
def test_offloaded_requests_decode_identically(llama, prompts, unconstrained, pool):
    ids, mask = prompts
    out = llama.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, **SMALL_POOLS[pool], **SPEC)
    assert out.spec_stats["num_offloads"] > 0
    torch.testing.assert_close(out.sequences, unconstrained, rtol=0, atol=0)


@pytest.mark.parametrize("pool", ["pages of 4", "pages of 16"])
def test_without_offload_a_small_pool_fails_clearly_or_decodes_identically(llama, prompts, unconstrained, pool):
    ids, mask = prompts
    try:
        out = llama.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, offload=False, **SMALL_POOLS[pool], **SPEC)
    except MemoryError as error:
        assert "offload" in str(error) and "kv_pool_tokens" in str(error)
    else:
        torch.testing.assert_close(out.sequences, unconstrained, rtol=0, atol=0)
    assert llama.config._attn_implementation == "sdpa"


def test_pool_smaller_than_one_request(llama, prompts, unconstrained):
    ids, mask = prompts
    with pytest.raises(MemoryError, match="cannot hold even one request.*kv_pool_tokens"):
        llama.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, page_size=4, kv_pool_tokens=64, **SPEC)
    # The engine recovers: the next call, with room, decodes normally.
    out = llama.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, **SPEC)
    torch.testing.assert_close(out.sequences, unconstrained, rtol=0, atol=0)
