"""Simulated decode of one batch with fixed and adaptive draft lengths (the basis of
``draft_length.VERIFY_COST``), CPU only, seconds:

    python3 benchmarks/draft_length_sim.py > benchmarks/results/draft_length_sim.txt

Each request accepts each draft with its own probability, drawn from a Beta distribution whose
mean acceptance at k=8 brackets the H200's 4.97 of 8 at batch 128 x 16k. A step costs a fixed part
plus a cost per draft and per verification row, with the values from that run
(session-4 results: ~0.6 ms per step, ~4 us per draft row, ~117 us per verification row in
mixed steps), and a second verification cost (40 us) for faster verification kernels. Requests
verify, sit out one iteration (delayed verification), and start staggered as the unified
scheduler starts them. Adaptive rounds use the engine's own estimator (``AcceptanceEstimate``) and
choose the length with the most expected tokens per (k + c) for the cost c listed. A last table
switches the batch's remaining requests to plain decoding (one token per step, ``PLAIN_MS`` a row)
once few are left.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_sparsespec.generation.draft_length import AcceptanceEstimate, expected_tokens  # noqa: E402

FIXED_MS, DRAFT_MS = 0.6, 0.004
# A plain decode row at 16k: (2.96 ms per nospec step - the fixed part) / 128 rows (session 7).
PLAIN_MS = 0.018
MAX_DRAFT, NEW_TOKENS, BATCH = 8, 512, 128


def choose(rate: float, longest: int, cost: float | None) -> int:
    if longest <= 0 or cost is None:
        return max(longest, 0)
    return max(range(1, longest + 1), key=lambda k: expected_tokens(k, rate) / (k + cost))


def simulate(rates: list[float], cost: float | None, verify_ms: float, seed: int = 0, plain_below: int = 0) -> tuple[float, int]:
    """Tokens per ms of the whole batch and the number of steps, for one draft-length rule; with
    ``plain_below``, once that few requests are left they decode one token per step, unspeculated."""
    rng = random.Random(seed)
    n = len(rates)
    remaining = [NEW_TOKENS] * n
    estimate = [AcceptanceEstimate() for _ in range(n)]
    round_len = [choose(estimate[i].rate, MAX_DRAFT, cost) for i in range(n)]
    drafted = [i % (MAX_DRAFT + 1) for i in range(n)]  # staggered start
    sitting_out = [0] * n
    elapsed, steps = 0.0, 0
    while any(r > 0 for r in remaining):
        live = [i for i in range(n) if remaining[i] > 0]
        if len(live) <= plain_below:
            elapsed += FIXED_MS + len(live) * PLAIN_MS
            steps += 1
            for i in live:
                remaining[i] -= 1
            continue
        drafts, verified = 0, []
        for i in range(n):
            if remaining[i] <= 0:
                continue
            if sitting_out[i]:
                sitting_out[i] -= 1
            elif drafted[i] < round_len[i]:
                drafted[i] += 1
                drafts += 1
            else:
                verified.append(i)
        if not drafts and not verified:
            continue
        elapsed += FIXED_MS + drafts * DRAFT_MS + len(verified) * verify_ms
        steps += 1
        for i in verified:
            accepted = 0
            while accepted < round_len[i] and rng.random() < rates[i]:
                accepted += 1
            estimate[i].observe(accepted, round_len[i])
            remaining[i] -= accepted + 1
            drafted[i], sitting_out[i] = 0, 1
            round_len[i] = choose(estimate[i].rate, min(MAX_DRAFT, remaining[i] - 1), cost)
    return n * NEW_TOKENS / elapsed, steps


def main() -> None:
    rng = random.Random(1)
    populations = {
        "Beta(9,1)": [min(0.995, rng.betavariate(9, 1)) for _ in range(BATCH)],
        "Beta(14,1)": [min(0.995, rng.betavariate(14, 1)) for _ in range(BATCH)],
    }
    rules = [("fixed k=8", None)] + [(f"adaptive c={c}", c) for c in (2, 4, 6, 8, 15)]
    for name, rates in populations.items():
        mean_accepted = sum(sum(a**j for j in range(1, MAX_DRAFT + 1)) for a in rates) / len(rates)
        print(f"{name}: mean accepted at k=8 {mean_accepted:.2f} of 8")
        for verify_ms in (0.117, 0.04):
            for rule, cost in rules:
                rate, steps = simulate(rates, cost, verify_ms)
                print(f"  verification {verify_ms * 1e3:.0f} us  {rule:15s} {rate:6.1f}k tokens/s  {steps} steps")
    # Session 7: verification rows at today's costs (86 us per position-scored row, 61 with block
    # scores, from the mixed steps' kernel time), the batch's last requests decoded plainly, and
    # plain decoding throughout (nospec) for reference.
    print("plain decoding for the last requests (tokens/s and steps by how many are left when it starts)")
    for name, rates in populations.items():
        print(f"{name}: nospec {simulate(rates, None, 0.0, plain_below=BATCH)[0]:.1f}k tokens/s")
        for verify_ms in (0.086, 0.061):
            for rule, cost in (rules[0], ("adaptive c=6", 6)):
                cells = []
                for plain_below in (0, 8, 16, 32, 64):
                    rate, steps = simulate(rates, cost, verify_ms, plain_below=plain_below)
                    cells.append(f"{plain_below:>2}: {rate:4.1f}k/{steps}")
                print(f"  verification {verify_ms * 1e3:.0f} us  {rule:15s} " + "  ".join(cells))


if __name__ == "__main__":
    main()
