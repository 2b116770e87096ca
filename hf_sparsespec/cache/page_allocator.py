"""Fixed-size page bookkeeping for the paged KV pool (host side, no tensors)."""

from __future__ import annotations


class OutOfPages(RuntimeError):
    """The pool has fewer free pages than a request needs right now."""


class PageAllocator:
    """Hands out page ids from a free list; pages come back when a request shrinks or ends."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"A KV pool needs at least one page, got {num_pages}.")
        self.num_pages = num_pages
        # Popping from the end hands out low ids first, which keeps small runs compact.
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfPages(f"needed {count} KV pages, {len(self._free)} of {self.num_pages} free")
        taken = self._free[len(self._free) - count :]
        del self._free[len(self._free) - count :]
        return taken[::-1]

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))
