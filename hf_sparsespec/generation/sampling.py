"""Logits processing, sampling and lossless verification, batched over positions of different requests.

transformers' logits processors expect one ``input_ids`` row per score row, all of equal length;
a packed SparseSpec step has positions of many requests at many lengths. Processors that look only
at the scores are called as they are; the two families that read ``input_ids`` (repetition penalty
and minimum length) are re-expressed here over per-position state, with transformers' semantics.
Everything else is refused by name rather than applied wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation import logits_process as lp

# Processors whose output depends only on the scores they are given, row by row.
SCORE_ONLY_PROCESSORS = (
    lp.TemperatureLogitsWarper,
    lp.TopKLogitsWarper,
    lp.TopPLogitsWarper,
    lp.MinPLogitsWarper,
    lp.TypicalLogitsWarper,
    lp.EpsilonLogitsWarper,
    lp.EtaLogitsWarper,
    lp.SuppressTokensLogitsProcessor,
    lp.InfNanRemoveLogitsProcessor,
    lp.LogitNormalization,
)


@dataclass
class PositionState:
    """What length-dependent processors need to know about each logits position.

    Attributes:
        hf_length: [N] length of the ``input_ids`` row transformers would pass at this position
            (padded prompt plus tokens generated before it).
        prompt_width: the padded prompt width of the call.
        presence: [N, V] bool, tokens present in that row (only built when a repetition penalty needs it).
    """

    hf_length: torch.Tensor
    prompt_width: int
    presence: torch.Tensor | None = None


class LogitsPlan:
    """A ``LogitsProcessorList`` compiled into batched operations, applied identically to draft and target."""

    def __init__(self, processors: list, do_sample: bool) -> None:
        self.do_sample = do_sample
        self.steps: list = []
        self.needs_presence = False
        for proc in processors:
            if isinstance(proc, SCORE_ONLY_PROCESSORS):
                self.steps.append(proc)
            elif isinstance(proc, lp.RepetitionPenaltyLogitsProcessor):
                self.needs_presence = True
                self.steps.append(proc)
            elif isinstance(proc, (lp.MinLengthLogitsProcessor, lp.MinNewTokensLengthLogitsProcessor)):
                self.steps.append(proc)
            else:
                raise NotImplementedError(
                    f"SparseSpec cannot apply the logits processor {type(proc).__name__} losslessly to speculative "
                    "drafts. Supported: temperature, top-k, top-p, min-p, typical, epsilon, eta, suppress_tokens, "
                    "repetition_penalty, min_length and min_new_tokens. Drop that option or use plain `generate`."
                )
        self.signature = (do_sample, tuple(_describe(proc) for proc in self.steps))
        self._eos_masks: dict[tuple, torch.Tensor] = {}
        penalties = [p for p in self.steps if isinstance(p, lp.RepetitionPenaltyLogitsProcessor)]
        if len(penalties) > 1:
            raise NotImplementedError("SparseSpec supports one repetition penalty processor per call.")
        ignore = getattr(penalties[0], "prompt_ignore_length", None) if penalties else None
        # Read once here: in the decoding loop a host read of a device tensor would stall the GPU queue.
        self._ignore = ignore.view(-1).tolist() if isinstance(ignore, torch.Tensor) else ignore

    def repetition_ignore(self, row: int) -> int:
        """Leading tokens of a batch row the repetition penalty skips (newer transformers skip padding)."""
        if self._ignore is None:
            return 0
        if isinstance(self._ignore, list):
            return self._ignore[row]
        return int(self._ignore)

    def apply(self, logits: torch.Tensor, state: PositionState) -> torch.Tensor:
        """Processed float32 scores for logits [N, V]."""
        scores = logits.float()
        dummy_ids = torch.zeros((scores.shape[0], 1), dtype=torch.long, device=scores.device)
        for proc in self.steps:
            if isinstance(proc, lp.RepetitionPenaltyLogitsProcessor):
                penalized = torch.where(scores < 0, scores * proc.penalty, scores / proc.penalty)
                scores = torch.where(state.presence, penalized, scores)
            elif isinstance(proc, (lp.MinLengthLogitsProcessor, lp.MinNewTokensLengthLogitsProcessor)):
                if isinstance(proc, lp.MinLengthLogitsProcessor):
                    too_short = state.hf_length < proc.min_length
                else:
                    too_short = (state.hf_length - proc.prompt_length_to_skip) < proc.min_new_tokens
                eos = self._eos_mask(proc, scores.shape[-1], scores.device)
                scores = scores.masked_fill(too_short[:, None] & eos[None, :], float("-inf"))
            else:
                scores = proc(dummy_ids, scores)
        return scores

    def _eos_mask(self, proc, vocab: int, device: torch.device) -> torch.Tensor:
        # Built once outside graph capture: a host-to-device copy is not allowed while capturing.
        key = (id(proc), vocab, device)
        if key not in self._eos_masks:
            mask = torch.zeros(vocab, dtype=torch.bool)
            mask[torch.as_tensor(proc.eos_token_id).long().view(-1).cpu()] = True
            self._eos_masks[key] = mask.to(device)
        return self._eos_masks[key]

    def pick(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Choose one token per row; also return the probabilities sampled from (None when greedy)."""
        if not self.do_sample:
            return torch.argmax(scores, dim=-1), None
        probs = torch.softmax(scores, dim=-1)
        return sample(probs), probs


def _describe(proc) -> tuple:
    """A hashable summary of a processor's settings: equal summaries process scores identically."""
    def freeze(value):
        if isinstance(value, torch.Tensor):
            return tuple(value.view(-1).tolist())
        if isinstance(value, (list, tuple)):
            return tuple(freeze(v) for v in value)
        return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)

    return (type(proc).__name__, tuple(sorted((k, freeze(v)) for k, v in vars(proc).items())))


def verify_drafts(
    target_scores: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_drafts: torch.Tensor,
    draft_probs: torch.Tensor | None,
    do_sample: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative verification (Leviathan et al.), greedy as its temperature-0 case.

    Args:
        target_scores: [R, k+1, V] processed target scores; position j scores the token after draft j.
        draft_tokens: [R, k] drafted tokens (entries past ``num_drafts`` are ignored).
        num_drafts: [R] drafts in each row's round.
        draft_probs: [R, k, V] the distributions the drafts were sampled from (sampling only).
    Returns:
        accepted [R] number of drafts kept, and next_token [R]: the correction or bonus token.
    """
    rows, k = draft_tokens.shape
    device = target_scores.device
    in_round = torch.arange(k, device=device)[None, :] < num_drafts[:, None]
    if not do_sample:
        best = torch.argmax(target_scores, dim=-1)  # [R, k+1]
        ok = (draft_tokens == best[:, :k]) & in_round
        accepted = torch.cumprod(ok.long(), dim=1).sum(dim=1)
        return accepted, best.gather(1, accepted[:, None]).squeeze(1)
    target_probs = torch.softmax(target_scores, dim=-1)
    safe_tokens = draft_tokens.clamp(min=0)[..., None]
    p = target_probs[:, :k].gather(2, safe_tokens).squeeze(2)
    q = draft_probs.gather(2, safe_tokens).squeeze(2)
    u = torch.rand(rows, k, device=device)
    ok = (u * q < p) & in_round
    accepted = torch.cumprod(ok.long(), dim=1).sum(dim=1)
    at = accepted[:, None, None].expand(rows, 1, target_probs.shape[-1])
    p_at = target_probs.gather(1, at).squeeze(1)
    rejected = accepted < num_drafts
    q_at = draft_probs.gather(1, at.clamp(max=k - 1)).squeeze(1) if k > 0 else torch.zeros_like(p_at)
    residual = (p_at - q_at).clamp(min=0)
    mass = residual.sum(dim=-1, keepdim=True)
    # A zero residual means p == q there, which makes rejection impossible; keep p to stay well defined.
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_at)
    final = torch.where(rejected[:, None], residual, p_at)
    return accepted, sample(final)


def sample(weights: torch.Tensor) -> torch.Tensor:
    """One index per row of non-negative ``weights`` [N, V], drawn in proportion to them.

    The exponential race: ``argmax(w / E)`` with ``E ~ Exp(1)`` picks ``i`` with probability
    ``w_i / sum(w)``. ``E = -log(U)`` with ``U`` in ``[0, 1)`` is never 0 (``Tensor.exponential_``
    has returned exact zeros on CUDA, which would pick a zero-weight index). Unlike
    ``torch.multinomial`` it has no device-side assert, so a non-finite row cannot abort the CUDA
    context before ``check_finite`` reports where it came from.
    """
    return torch.argmax(weights / -torch.rand_like(weights).log(), dim=-1)
