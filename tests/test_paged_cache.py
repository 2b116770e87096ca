"""PagedKVCache against a plain dict-of-lists model, under random sequences of page operations.

Hypothesis drives reserve / write / truncate / release / offload / restore on a small pool; after every
step the contents read back through the block tables must equal the model's, no page may belong to
two live requests, and every page is either free or owned.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hf_sparsespec.attention.context import step_context
from hf_sparsespec.cache import OutOfPages, PagedKVCache

LAYERS, HEADS, HEAD_DIM = 2, 2, 3
NUM_PAGES = 10
SEQ_IDS = st.integers(0, 4)


class PagedCacheMachine(RuleBasedStateMachine):
    @initialize(page_size=st.sampled_from([1, 3, 16]))
    def make_cache(self, page_size):
        self.page_size = page_size
        self.cache = PagedKVCache(
            num_layers=LAYERS, num_kv_heads=HEADS, head_dim=HEAD_DIM, num_pages=NUM_PAGES,
            page_size=page_size, dtype=torch.float32, device="cpu",
        )
        # Model: per live request, the (key, value) of each written position, [L, H, D] tensors each.
        self.contents: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.capacity: dict[int, int] = {}  # positions the request's pages can hold
        self.offloaded: dict[int, tuple[object, list]] = {}
        self.counter = 0

    def fresh_kv(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Distinct values per write, so a misplaced slot cannot go unnoticed."""
        self.counter += 1
        base = torch.arange(n * LAYERS * HEADS * HEAD_DIM, dtype=torch.float32).view(LAYERS, HEADS, n, HEAD_DIM)
        return base + 1000 * self.counter, -(base + 1000 * self.counter)

    def live(self) -> list[int]:
        return sorted(self.capacity)

    @rule(seq=SEQ_IDS, extra=st.integers(0, 40))
    def reserve(self, seq, extra):
        if seq in self.offloaded:
            return
        length = len(self.contents.get(seq, [])) + extra
        free_before, pages_before = self.cache.allocator.num_free, list(self.cache.pages(seq))
        try:
            self.cache.reserve(seq, length)
        except OutOfPages:
            # A failed reservation changes nothing.
            assert self.cache.allocator.num_free == free_before
            assert self.cache.pages(seq) == pages_before
            return
        self.contents.setdefault(seq, [])
        self.capacity[seq] = max(self.capacity.get(seq, 0), self.cache.pages_for(length) * self.page_size)

    @precondition(lambda self: self.capacity)
    @rule(data=st.data())
    def write(self, data):
        """Write positions [start, start + n) of a request through ``PagedKVCache.update``, as a model layer would."""
        seq = data.draw(st.sampled_from(self.live()))
        written = len(self.contents[seq])
        start = data.draw(st.integers(0, written))  # overwrite (a verification over drafts) or append
        n = data.draw(st.integers(0, self.capacity[seq] - start))
        keys, values = self.fresh_kv(n)
        pages = self.cache.pages(seq)
        slots = torch.tensor([pages[p // self.page_size] * self.page_size + p % self.page_size for p in range(start, start + n)], dtype=torch.long)
        # Padding tokens (slot -1) in the same step must be skipped.
        slots = torch.cat([slots, torch.tensor([-1], dtype=torch.long)])
        keys = torch.cat([keys, torch.full((LAYERS, HEADS, 1, HEAD_DIM), float("nan"))], dim=2)
        values = torch.cat([values, torch.full((LAYERS, HEADS, 1, HEAD_DIM), float("nan"))], dim=2)
        with step_context(SimpleNamespace(slot_mapping=slots, use_triton=False)):
            for layer in range(LAYERS):
                self.cache.update(keys[layer][None], values[layer][None], layer)
        model = self.contents[seq]
        for i in range(n):
            kv = (keys[:, :, i], values[:, :, i])
            if start + i < len(model):
                model[start + i] = kv
            else:
                model.append(kv)

    @precondition(lambda self: self.capacity)
    @rule(data=st.data())
    def truncate(self, data):
        seq = data.draw(st.sampled_from(self.live()))
        length = data.draw(st.integers(0, len(self.contents[seq])))
        self.cache.truncate(seq, length)
        del self.contents[seq][length:]
        self.capacity[seq] = min(self.capacity[seq], self.cache.pages_for(length) * self.page_size)

    @precondition(lambda self: self.capacity)
    @rule(data=st.data())
    def release(self, data):
        seq = data.draw(st.sampled_from(self.live()))
        self.cache.release(seq)
        del self.contents[seq], self.capacity[seq]

    @precondition(lambda self: self.capacity)
    @rule(data=st.data())
    def offload(self, data):
        seq = data.draw(st.sampled_from(self.live()))
        saved = self.cache.offload(seq, len(self.contents[seq]))
        assert not self.cache.has(seq)
        self.offloaded[seq] = (saved, self.contents.pop(seq))
        del self.capacity[seq]

    @precondition(lambda self: self.offloaded)
    @rule(data=st.data())
    def restore(self, data):
        seq = data.draw(st.sampled_from(sorted(self.offloaded)))
        saved, model = self.offloaded[seq]
        if self.cache.allocator.num_free < self.cache.pages_for(len(model)):
            with pytest.raises(OutOfPages):
                self.cache.restore(seq, saved)
            return
        self.cache.restore(seq, saved)
        del self.offloaded[seq]
        self.contents[seq] = model
        self.capacity[seq] = self.cache.pages_for(len(model)) * self.page_size

    @invariant()
    def contents_read_back_through_block_tables(self):
        if not hasattr(self, "cache"):
            return
        width = NUM_PAGES
        for seq in self.live():
            model = self.contents[seq]
            if not model:
                continue
            table = self.cache.block_table([seq], width)[0].long()
            positions = torch.arange(len(model))
            slots = table[positions // self.page_size] * self.page_size + positions % self.page_size
            expected_k = torch.stack([k for k, _ in model], dim=2)  # [L, H, T, D]
            expected_v = torch.stack([v for _, v in model], dim=2)
            torch.testing.assert_close(self.cache.keys[:, slots].transpose(1, 2), expected_k, rtol=0, atol=0)
            torch.testing.assert_close(self.cache.values[:, slots].transpose(1, 2), expected_v, rtol=0, atol=0)

    @invariant()
    def pages_owned_once_and_conserved(self):
        if not hasattr(self, "cache"):
            return
        owned = [page for seq in self.live() for page in self.cache.pages(seq)]
        assert len(owned) == len(set(owned)), "a page belongs to two live requests"
        assert all(0 <= page < NUM_PAGES for page in owned)
        assert len(owned) + self.cache.allocator.num_free == NUM_PAGES
        for seq in self.live():
            assert len(self.cache.pages(seq)) * self.page_size == self.capacity[seq]
        for seq in self.offloaded:
            assert not self.cache.has(seq)


PagedCacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
test_paged_cache = PagedCacheMachine.TestCase
