"""Adaptive draft length: each request drafts as many tokens per round as its recent acceptance pays for.

A round of k drafts costs k draft rows plus its verification row; it yields
``1 + a + a^2 + ... + a^k`` tokens on average when each draft is accepted with probability ``a``. Maximising tokens per unit of cost gives long rounds to requests
whose drafts are mostly right and short ones to the others. That matters most at the end of a
batch: the requests with the lowest acceptance finish last, in iterations of few rows whose fixed
cost no longer shrinks, so their wasted drafts set the batch's finishing time.
"""

from __future__ import annotations

from dataclasses import dataclass

# A round's verification row, in units of one draft row. A verification reads the whole context (a
# draft only its selection) and does the selection, so it costs several draft rows. Fitted while a
# verified request still sat out one iteration (before early drafts); not re-fitted since.
# benchmarks/draft_length_sim.py (a batch of 128 with step costs from the H200 at 16k) finds 4 to 8
# within a few percent of the best in every setting it models, and fixed rounds of 8 10-35% slower;
# on the H200 itself 6 gave +11% at batch 128 x 16k (session-4 results).
VERIFY_COST = 6.0
# Recent rounds weigh most: a request's text changes character (boilerplate, then logic).
DECAY = 0.7
# Before any round: a rate typical of the bundled model, worth two draft outcomes.
PRIOR_RATE, PRIOR_WEIGHT = 0.8, 2.0


@dataclass
class AcceptanceEstimate:
    """Recency-weighted share of checked drafts that were accepted."""

    accepted: float = PRIOR_RATE * PRIOR_WEIGHT
    checked: float = PRIOR_WEIGHT

    def observe(self, accepted: int, drafted: int) -> None:
        """Record a verified round: the first ``accepted`` of ``drafted`` drafts were right."""
        if drafted <= 0:
            return
        # Drafts past the first rejected one were never checked on their own.
        checked = accepted + (1 if accepted < drafted else 0)
        self.accepted = DECAY * self.accepted + accepted
        self.checked = DECAY * self.checked + checked

    @property
    def rate(self) -> float:
        return self.accepted / self.checked


def expected_tokens(draft_len: int, rate: float) -> float:
    """Tokens a round commits on average: accepted drafts plus the verification's own token."""
    return sum(rate**i for i in range(draft_len + 1))


def best_draft_len(rate: float, longest: int) -> int:
    """The draft length in ``[1, longest]`` with the most tokens per unit of round cost."""
    if longest <= 0:
        return 0
    return max(range(1, longest + 1), key=lambda k: expected_tokens(k, rate) / (k + VERIFY_COST))
