"""Step inputs of CUDA graphs: few distinct padded sizes, little padding on large steps, and the
padded arrays packed back to back."""

from __future__ import annotations

import numpy as np
import torch

from hf_sparsespec.generation.graphs import bucket
from hf_sparsespec.generation.step_builder import padding_values
from hf_sparsespec.generation.upload import pack_padded


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


def test_padded_packing_matches_padding_each_array():
    padding = padding_values(dummy_slot=7)
    rng = np.random.default_rng(0)
    arrays = {name: rng.integers(-3, 100, size=int(rng.integers(0, 6))) for name in padding}
    arrays["q_len"] = [1, 2, 3]  # lists are accepted too
    sizes = {name: len(values) + int(rng.integers(0, 4)) for name, values in arrays.items()}
    expected = np.concatenate([
        np.pad(np.asarray(values, np.int64), (0, sizes[name] - len(values)), constant_values=padding[name])
        for name, values in arrays.items()
    ])
    got = pack_padded(arrays, sizes, padding, torch.device("cpu"))
    assert got.dtype == torch.int64 and torch.equal(got, torch.from_numpy(expected))
