"""Which cached tokens a request's next drafts attend to, chosen after each verification.

Every policy is written as a priority over positions: the ``count`` highest-priority positions
among ``[0, old_len)`` are selected (positions from ``old_len`` on form the tail that drafts always
see). ``+inf`` forces a position in, ``-inf`` keeps it out. Everything is batched tensor code: it runs
on the device after every verification, inside the captured decode iteration, so it may not read
anything back to the host or depend on per-request Python. On CUDA the engine's policies run as one
Triton kernel (``selection_kernel.py``) with the same result.

docs/selection.md has the measurements behind the "pillar" knobs.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

SINK_TOKENS = 4  # "window": StreamingLLM's attention sinks
# "pillar": a position's priority is the best verification score from PILLAR_LOOKBACK positions
# before it to PILLAR_LOOKAHEAD after it, so the span that follows a strongly attended token comes
# in with it. Forward-leaning because a copying (induction) head attends one position further on
# for each drafted token. Symmetric pooling (3 and 3, the previous default) and a 0.25 or 0.75
# recent share did no better, beyond the seed spread, at 4k (docs/selection.md, "Screen").
PILLAR_LOOKBACK = 8
PILLAR_LOOKAHEAD = 1
PILLAR_RECENT_FRACTION = 0.5  # "pillar": share of the budget given to the most recent positions
PILLAR_SINKS = 0  # "pillar": forced leading positions; pooled scores pick the sinks anyway
# "pillar": positions are scored by the attention mass of their aligned block of this many
# positions, before the pooling; 1 scores each position alone. 16-position blocks (which a kernel
# could sum during the attention pass itself) did better at 4k and a 5% budget but worse at 8k and
# at 2% (screen in docs/selection.md).
PILLAR_BLOCK = 1


def block_masses(scores: torch.Tensor, block: int) -> torch.Tensor:
    """Sums of ``scores`` over aligned blocks of ``block`` positions: [..., ceil(N / block)]."""
    n = scores.shape[-1]
    return F.pad(scores, (0, (-n) % block)).unflatten(-1, (-1, block)).sum(-1)


def pillar_priority(
    scores: torch.Tensor,
    old_len: torch.Tensor,
    count: torch.Tensor,
    lookback: int = PILLAR_LOOKBACK,
    lookahead: int = PILLAR_LOOKAHEAD,
    recent_fraction: float = PILLAR_RECENT_FRACTION,
    sinks: int = PILLAR_SINKS,
    block: int = PILLAR_BLOCK,
) -> torch.Tensor:
    """Scores (block masses if ``block > 1``), max-pooled, with the newest ``recent_fraction`` of the
    budget and ``sinks`` forced in.

    Pooling rewards the neighbours of a high-scoring token: a draft that copies a span needs the
    tokens after the one the verification looked at (an induction head moves one position per
    drafted token), which the verification's own queries had no reason to attend to yet.
    """
    n = scores.shape[-1]
    positions = torch.arange(n, device=scores.device)
    candidate = positions[None, :] < old_len[:, None]  # [V, N]
    if block > 1:
        scores = block_masses(scores, block).repeat_interleave(block, dim=-1)[..., :n]
    if lookback or lookahead:
        flat = F.pad(scores.flatten(0, 2).unsqueeze(1), (lookback, lookahead), value=float("-inf"))
        priority = F.max_pool1d(flat, lookback + lookahead + 1, stride=1).view_as(scores)
    else:
        priority = scores
    forced = positions[None, :] < sinks
    if recent_fraction > 0:
        recent = torch.floor(count.to(torch.float32) * recent_fraction).long()
        forced = forced | (positions[None, :] >= (old_len - recent)[:, None])
    priority = priority.masked_fill((forced & candidate)[:, None, None, :], float("inf"))
    return priority.masked_fill(~candidate[:, None, None, :], float("-inf"))


# "pillar_block": verification scores come at this block granularity (every position holds an
# equal share of its aligned block's mass), which the attention kernel sums in its own pass.
SCORE_BLOCK = 16
# "pillar_block" forces no recent window: over block masses the whole budget goes by score (local
# heads still fill theirs with recent blocks). Against the block rule with a recent half that was
# ahead in three of four CPU cells and level in the fourth; at 4k/10%, where pillar misses its
# goal, it is 1.146x window (docs/selection.md, session-7 screen). Single positions keep their
# recent half: without it they lost 0.6 at 8k/5%.
PILLAR_BLOCK_RECENT_FRACTION = 0.0


def score_block(policy: str) -> int:
    """Granularity of the verification scores a policy reads (1: per position)."""
    return SCORE_BLOCK if policy == "pillar_block" else 1


def needs_scores(policy: str) -> bool:
    """Whether the policy reads the verification's PillarAttn scores ("window" goes by position only,
    so its verifications skip the score pass)."""
    return policy != "window"


def selection_priority(scores: torch.Tensor, old_len: torch.Tensor, count: torch.Tensor, policy: str) -> torch.Tensor:
    """Priority of each position, [V, L, H, N] float32, -inf at and past ``old_len``.

    Args:
        scores: [V, L, H, N] PillarAttn scores of the verification rows.
        old_len: [V] positions below this are candidates.
        count: [V] how many will be selected.
        policy: "paper", "window", "pillar" or "pillar_block" (whose scores are block shares already).
    """
    n = scores.shape[-1]
    positions = torch.arange(n, device=scores.device)
    candidate = positions[None, :] < old_len[:, None]  # [V, N]
    if policy == "paper":
        # The published rule: raw Top-K of the averaged verification scores, no sink, no pooling.
        priority = scores
    elif policy == "window":
        priority = positions.to(torch.float32).expand_as(scores)
        priority = priority.masked_fill(positions < SINK_TOKENS, float("inf"))
    elif policy == "pillar":
        return pillar_priority(scores, old_len, count)
    elif policy == "pillar_block":
        return pillar_priority(scores, old_len, count, recent_fraction=PILLAR_BLOCK_RECENT_FRACTION)
    else:
        raise ValueError(f"unknown selection policy {policy!r}")
    return priority.masked_fill(~candidate[:, None, None, :], float("-inf"))


def top_positions(priority: torch.Tensor, count: torch.Tensor, width: int) -> torch.Tensor:
    """The ``count[v]`` highest-priority positions: [V, L, H, width] int32, ascending, -1 padded.

    Among equal priorities the lower positions go first (block scores tie a block's positions), so
    the result is a function of the priorities alone, as the Triton kernel computes it.
    """
    k = min(width, priority.shape[-1])
    top = torch.sort(priority, dim=-1, descending=True, stable=True).indices[..., :k]  # best first
    rank_ok = torch.arange(k, device=priority.device)[None, :] < count[:, None]  # [V, k]
    # Ascending positions read the pool in order; -1 padding goes last.
    big = torch.iinfo(torch.int32).max
    chosen = top.masked_fill(~rank_ok[:, None, None, :], big).to(torch.int64)
    chosen = torch.sort(chosen, dim=-1).values
    chosen = chosen.masked_fill(chosen == big, -1).to(torch.int32)
    if k < width:
        chosen = F.pad(chosen, (0, width - k), value=-1)
    return chosen


@dataclass(frozen=True)
class KernelRule:
    """A policy as the Triton selection kernel computes it: the priority of a position is its score
    max-pooled over ``lookback`` positions before and ``lookahead`` after (or the position itself
    when ``by_position``), with the first ``sinks`` positions and the newest ``recent_fraction`` of
    the budget forced in."""

    lookback: int = 0
    lookahead: int = 0
    recent_fraction: float = 0.0
    sinks: int = 0
    by_position: bool = False


def kernel_rule(policy: str) -> KernelRule | None:
    """The kernel's knobs for ``policy``, or None where it has none (block-summed "pillar")."""
    if policy == "paper":
        return KernelRule()
    if policy == "window":
        return KernelRule(sinks=SINK_TOKENS, by_position=True)
    if policy == "pillar" and PILLAR_BLOCK == 1:
        return KernelRule(PILLAR_LOOKBACK, PILLAR_LOOKAHEAD, PILLAR_RECENT_FRACTION, PILLAR_SINKS)
    if policy == "pillar_block":
        return KernelRule(PILLAR_LOOKBACK, PILLAR_LOOKAHEAD, PILLAR_BLOCK_RECENT_FRACTION, PILLAR_SINKS)
    return None


def select_tokens(
    scores: torch.Tensor, old_len: torch.Tensor, count: torch.Tensor, policy: str, width: int,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """Selected positions per (request, layer, KV head): [V, L, H, width] int32, ascending, -1 padded.

    ``count[v] <= min(old_len[v], width)`` entries of row ``v`` are valid. ``use_triton`` runs the
    Triton kernel (same result); None picks it for CUDA tensors when Triton is installed.
    """
    rule = kernel_rule(policy)
    if use_triton is None:
        use_triton = scores.is_cuda and importlib.util.find_spec("triton") is not None
    if use_triton and rule is not None:
        from .selection_kernel import select_tokens_triton

        return select_tokens_triton(scores, old_len, count, width, **asdict(rule))
    return top_positions(selection_priority(scores, old_len, count, policy), count, width)
