"""The SparseSpec decoding strategy."""

from .strategy import SparseSpecOutput, generate

__all__ = ["SparseSpecOutput", "generate"]
