"""Paged KV storage as a ``transformers.Cache``: one preallocated pool per layer, pages per request."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers.cache_utils import Cache

from ..attention.context import get_step_context
from .page_allocator import OutOfPages, PageAllocator

__all__ = ["PagedKVCache", "OutOfPages", "HostKV"]


@dataclass
class HostKV:
    """A request's KV moved to host memory: [L, tokens, H, D] for keys and values."""

    keys: torch.Tensor
    values: torch.Tensor
    length: int


class PagedKVCache(Cache):
    """KV cache shared by all requests of an engine.

    Storage is ``[layers, num_pages * page_size, kv_heads, head_dim]`` for keys and for values; a
    request owns a list of pages (its block table) and position ``p`` lives in slot
    ``pages[p // page_size] * page_size + p % page_size``. The model writes into it through its usual
    ``update`` call; which slots receive the step's tokens comes from the engine's step context.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__(layers=[])
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.page_size = page_size
        self.dtype, self.device = dtype, torch.device(device)
        shape = (num_layers, num_pages * page_size, num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=dtype, device=self.device)
        self.allocator = PageAllocator(num_pages)
        self._pages: dict[int, list[int]] = {}
        # First page index of each request whose id may have changed since a mirror of the page
        # lists (the engine's device page table) last took the changes.
        self._changed: dict[int, int] = {}
        self._transfer_stream: torch.cuda.Stream | None = None

    # ---- transformers' Cache interface -------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the step's K/V (``(1, H, T, D)``) to their slots; return this layer's whole pools."""
        ctx = get_step_context()
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if ctx.use_triton:
            from ..attention.triton_kernels import write_kv

            write_kv(keys, values, key_states[0], value_states[0], ctx.slot_mapping)
        else:
            write_kv_reference(keys, values, key_states[0], value_states[0], ctx.slot_mapping)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Longest cached request, in tokens of page capacity (the pool holds many requests)."""
        return max((len(p) * self.page_size for p in self._pages.values()), default=0)

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.keys.shape[1]

    @property
    def is_compileable(self) -> bool:
        return False

    def __len__(self) -> int:
        return self.num_layers

    def __repr__(self) -> str:
        return (
            f"PagedKVCache(layers={self.num_layers}, pages={self.allocator.num_pages}x{self.page_size}, "
            f"free={self.allocator.num_free}, requests={len(self._pages)})"
        )

    # ---- request-level page management -------------------------------------------------------
    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    def pages_for(self, length: int) -> int:
        return -(-length // self.page_size)

    def pages(self, seq_id: int) -> list[int]:
        return self._pages.get(seq_id, [])

    def has(self, seq_id: int) -> bool:
        return seq_id in self._pages

    def extra_pages_needed(self, seq_id: int, length: int) -> int:
        return max(0, self.pages_for(length) - len(self.pages(seq_id)))

    def reserve(self, seq_id: int, length: int) -> None:
        """Make room for positions ``[0, length)``; raises ``OutOfPages`` without changing anything."""
        pages = self._pages.get(seq_id)
        if pages is not None and length <= len(pages) * self.page_size:
            return  # the common case, once per row and iteration: keep it cheap
        pages = self._pages.setdefault(seq_id, [])
        missing = self.pages_for(length) - len(pages)
        if missing > 0:
            try:
                new = self.allocator.allocate(missing)
            except OutOfPages:
                if not pages:
                    del self._pages[seq_id]
                raise
            self._mark_changed(seq_id, len(pages))
            pages.extend(new)

    def truncate(self, seq_id: int, length: int) -> None:
        """Release the pages that positions ``[0, length)`` do not touch (rejected drafts)."""
        pages = self._pages.get(seq_id)
        if pages is None:
            return
        keep = self.pages_for(length)
        if keep < len(pages):
            self.allocator.release(pages[keep:])
            del pages[keep:]
            self._mark_changed(seq_id, keep)

    def _mark_changed(self, seq_id: int, first_page: int) -> None:
        self._changed[seq_id] = min(self._changed.get(seq_id, first_page), first_page)

    def take_changes(self, seq_id: int) -> int | None:
        """First page of the request that changed since the last call for it, or None."""
        return self._changed.pop(seq_id, None)

    def release(self, seq_id: int) -> None:
        """Return every page of a finished (or offloaded) request."""
        self.allocator.release(self._pages.pop(seq_id, []))
        self._mark_changed(seq_id, 0)

    def slots(self, seq_id: int, positions: torch.Tensor) -> torch.Tensor:
        """Pool slots of the given positions of one request."""
        table = torch.tensor(self.pages(seq_id), dtype=torch.long)
        return table[positions // self.page_size] * self.page_size + positions % self.page_size

    def block_table(self, seq_ids: list[int | None], width: int) -> torch.Tensor:
        """[len(seq_ids), width] int32 page table, -1 padded; ``None`` gives an empty row."""
        table = torch.full((len(seq_ids), width), -1, dtype=torch.int32)
        for row, seq_id in enumerate(seq_ids):
            pages = self.pages(seq_id) if seq_id is not None else []
            if pages:
                table[row, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        return table

    # ---- offload to host memory --------------------------------------------------------------
    def offload(self, seq_id: int, length: int, chunk_tokens: int = 1024) -> HostKV:
        """Copy a request's first ``length`` positions to (pinned) host memory and free its pages.

        On CUDA the copies run on a side stream in chunks and the compute stream waits for them, so
        the host never blocks and the freed pages are not overwritten before they have been read.
        """
        pin = self.device.type == "cuda"
        shape = (self.num_layers, length, self.num_kv_heads, self.head_dim)
        host_k = torch.empty(shape, dtype=self.dtype, pin_memory=pin)
        host_v = torch.empty(shape, dtype=self.dtype, pin_memory=pin)
        with self._transfer():
            for start in range(0, length, chunk_tokens):
                end = min(start + chunk_tokens, length)
                slots = self._device_slots(seq_id, start, end)
                host_k[:, start:end].copy_(self.keys[:, slots], non_blocking=pin)
                host_v[:, start:end].copy_(self.values[:, slots], non_blocking=pin)
        self.release(seq_id)
        return HostKV(host_k, host_v, length)

    def restore(self, seq_id: int, saved: HostKV, chunk_tokens: int = 1024) -> None:
        """Bring an offloaded request back into fresh pages (raises ``OutOfPages`` if they are not free)."""
        self.reserve(seq_id, saved.length)
        with self._transfer():
            for start in range(0, saved.length, chunk_tokens):
                end = min(start + chunk_tokens, saved.length)
                slots = self._device_slots(seq_id, start, end)
                self.keys[:, slots] = saved.keys[:, start:end].to(self.device, non_blocking=True)
                self.values[:, slots] = saved.values[:, start:end].to(self.device, non_blocking=True)

    def _device_slots(self, seq_id: int, start: int, end: int) -> torch.Tensor:
        slots = self.slots(seq_id, torch.arange(start, end))
        if self.device.type == "cuda":
            return slots.pin_memory().to(self.device, non_blocking=True)
        return slots

    @contextmanager
    def _transfer(self) -> Iterator[None]:
        """Run host<->device KV copies on a side stream ordered after, and before, compute work."""
        if self.device.type != "cuda":
            yield
            return
        compute = torch.cuda.current_stream(self.device)
        if self._transfer_stream is None:
            self._transfer_stream = torch.cuda.Stream(self.device)
        self._transfer_stream.wait_stream(compute)
        with torch.cuda.stream(self._transfer_stream):
            yield
        compute.wait_stream(self._transfer_stream)


def write_kv_reference(
    k_pool: torch.Tensor, v_pool: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter ``keys``/``values`` ([H, T, D]) into the pools' slots; slot -1 marks padding to skip."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_pool.index_copy_(0, slots, keys.transpose(0, 1)[valid].to(k_pool.dtype))
    v_pool.index_copy_(0, slots, values.transpose(0, 1)[valid].to(v_pool.dtype))
