"""Hardware counters of the attention kernels on the cases that decide the goals, under Nsight Compute.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats --section SchedulerStats \
        python3 benchmarks/ncu_attention.py

Each case is built as ``kernels_check.py`` builds it, run twice unprofiled (compiles, caches), then once
between ``cudaProfilerStart`` and ``cudaProfilerStop``, so the report holds exactly that call's kernels
(the attention kernel, then the finish kernel where the case launches one), in the printed order.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from benchmarks.kernels_check import build, decode_rows
from hf_sparsespec.attention import triton_kernels


def cases():
    bf = torch.bfloat16
    drafts = build("qwen3-8b", bf, 16, decode_rows(["draft"] * 64, [8192] * 64), graph_like=True, tokens=64)
    yield "draft-only b64 8k qwen-shape", replace(drafts, ctx=replace(drafts.ctx, draft_only=True))
    drafts = None
    yield "unified b128 16k bench-shape scores", build(
        "bench", bf, 16, decode_rows(["verify"] * 14 + ["draft"] * 114, [16384] * 128), graph_like=True, tokens=256)
    verify = build("qwen3-8b", bf, 16, decode_rows(["verify"] * 64, [8192] * 64), graph_like=True, tokens=576)
    yield "lockstep verify b64 8k qwen-shape scores", replace(verify, ctx=replace(verify.ctx, verification_only=True))


def main() -> None:
    for label, batch in cases():
        run = lambda: triton_kernels.paged_attention(batch.query, batch.k_pool, batch.v_pool, batch.ctx, 0,  # noqa: E731
                                                     batch.query.shape[-1] ** -0.5)
        run()
        run()
        torch.cuda.synchronize()
        print(f"== profiled: {label}", flush=True)
        torch.cuda.cudart().cudaProfilerStart()
        run()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
