"""Padded step sizes for CUDA graphs: few distinct sizes, little padding on large steps."""

from __future__ import annotations

from hf_sparsespec.generation.graphs import bucket


def test_buckets_cover_the_step_and_pad_large_steps_by_at_most_an_eighth():
    sizes = [bucket(n) for n in range(1, 5000)]
    assert all(size >= n for n, size in enumerate(sizes, start=1))
    assert sizes == sorted(sizes)
    assert all(size - n <= n / 8 for n, size in enumerate(sizes, start=1) if n > 256)
    assert bucket(576) == 576 and bucket(257) == 288 and bucket(1153) == 1280


def test_small_steps_round_to_powers_of_two():
    assert [bucket(n) for n in (1, 8, 9, 100, 129, 256)] == [8, 8, 16, 128, 256, 256]
    assert bucket(1, at_least=1) == 1 and bucket(3, at_least=1) == 4
    # Distinct sizes grow with the logarithm of the largest step (8 per doubling past 256).
    assert len({bucket(n) for n in range(1, 8193)}) <= 6 + 8 * 5
