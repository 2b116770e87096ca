"""Paged KV storage."""

from .page_allocator import OutOfPages, PageAllocator
from .paged_cache import HostKV, PagedKVCache

__all__ = ["HostKV", "OutOfPages", "PageAllocator", "PagedKVCache"]
