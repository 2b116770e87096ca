"""Held-out code prompts for acceptance measurements.

bench-code-lm was trained on the CPython 3.12 standard library and the site-packages of a
scientific Python environment. This project's own sources, tests and benchmarks were written after
it and are in neither, so windows cut from them measure drafting on text the model has not memorised
(memorised text makes every draft policy look good).

The text is a frozen snapshot (``data/held_out_code.txt``, the project's ``.py`` files of
2026-11-29): cutting windows from the live sources made every edit of any file shift every prompt,
so runs made an hour apart measured different text.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = Path(__file__).resolve().parent / "data" / "held_out_code.txt"
SOURCE_DIRS = ("hf_sparsespec", "tests", "benchmarks")


def snapshot_sources() -> str:
    """The text the snapshot was made from (to refresh it, write this to ``SNAPSHOT``)."""
    files = sorted(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py"))
    return "\n\n".join(p.read_text() for p in files)


def held_out_text() -> str:
    return SNAPSHOT.read_text()


def held_out_prompts(tokenizer, num_tokens: int, count: int) -> list[torch.Tensor]:
    """``count`` windows of exactly ``num_tokens`` token ids, evenly spaced over the held-out text.

    Windows overlap when the text is shorter than ``count * num_tokens`` (8k contexts need that).
    """
    ids = torch.tensor(tokenizer(held_out_text()).input_ids)
    if len(ids) < num_tokens:
        raise ValueError(f"held-out text has {len(ids)} tokens, fewer than the {num_tokens} asked for")
    step = (len(ids) - num_tokens) // max(count - 1, 1)
    return [ids[i * step : i * step + num_tokens] for i in range(count)]


def prompts_digest(prompts: list[torch.Tensor]) -> str:
    """Short fingerprint, so runs on different machines can confirm they used the same prompts."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.numpy().tobytes())
    return h.hexdigest()[:12]
