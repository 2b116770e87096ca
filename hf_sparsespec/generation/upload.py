"""Host-to-device transfer of a step's small integer arrays in one asynchronous copy.

Creating device tensors from Python lists one by one costs a blocking copy each (pageable memory
makes CUDA wait for the stream). Packing every list of a step into one pinned buffer gives a single
copy that overlaps with the work already queued.
"""

from __future__ import annotations

import numpy as np
import torch


def pack(arrays: dict[str, np.ndarray | list[int]], device: torch.device) -> torch.Tensor:
    """The arrays back to back in one int64 host tensor, pinned when it is bound for a GPU."""
    parts = [np.asarray(values, dtype=np.int64) for values in arrays.values()]
    host = torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.int64))
    # The caching host allocator keeps a pinned block alive until the copy reading it has run.
    return host.pin_memory() if device.type == "cuda" else host


def pack_padded(arrays: dict[str, np.ndarray | list[int]], sizes: dict[str, int], padding: dict[str, int],
                device: torch.device) -> torch.Tensor:
    """Like ``pack``, each array first padded to ``sizes[name]`` with ``padding[name]``: written in
    place into one buffer rather than padded and copied array by array, since this runs on the
    host for every replayed step."""
    host = np.empty(sum(sizes[name] for name in arrays), np.int64)
    start = 0
    for name, values in arrays.items():
        n, size = len(values), sizes[name]
        host[start : start + n] = values
        host[start + n : start + size] = padding[name]
        start += size
    tensor = torch.from_numpy(host)
    return tensor.pin_memory() if device.type == "cuda" else tensor


def upload(arrays: dict[str, np.ndarray | list[int]], device: torch.device) -> dict[str, torch.Tensor]:
    """int64 device views, one per named list, from one host buffer."""
    on_device = pack(arrays, device).to(device, non_blocking=True)
    views, start = {}, 0
    for name, values in arrays.items():
        views[name] = on_device[start : start + len(values)]
        start += len(values)
    return views
