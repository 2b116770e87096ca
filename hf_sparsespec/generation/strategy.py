"""``generate``: SparseSpec as a transformers ``custom_generate`` decoding method."""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers.generation import GenerateDecoderOnlyOutput, GenerationMode
from transformers.generation import stopping_criteria as sc

from ..attention.interface import ATTENTION_NAME
from ..cache.paged_cache import PagedKVCache
from ..config import SparseSpecConfig
from .engine import Engine
from .model_checks import check_model_supported
from .request import Request
from .sampling import LogitsPlan

# Model kwargs that `generate` prepares for its own loop and that SparseSpec replaces with its own
# packed positions and paged cache.
_PREPARED_KWARGS = ("attention_mask", "position_ids", "use_cache", "logits_to_keep", "cache", "past_key_values", "cache_position")

_ENGINES: "weakref.WeakKeyDictionary[torch.nn.Module, Engine]" = weakref.WeakKeyDictionary()


@dataclass
class SparseSpecOutput(GenerateDecoderOnlyOutput):
    """``GenerateDecoderOnlyOutput`` plus ``spec_stats``: acceptance and speed counters of the call."""

    spec_stats: dict | None = None


def generate(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    logits_processor: list | None = None,
    stopping_criteria: list | None = None,
    generation_config: Any = None,
    draft_len: int | None = None,
    adaptive_draft: bool | None = None,
    budget_ratio: float | None = None,
    min_budget: int | None = None,
    max_budget: int | None = None,
    selection: str | None = None,
    speculate: bool | None = None,
    page_size: int | None = None,
    kv_pool_tokens: int | None = None,
    kv_memory_fraction: float | None = None,
    max_batch_size: int | None = None,
    prefill_chunk: int | None = None,
    unified_schedule: bool | None = None,
    verify_groups: int | None = None,
    plain_tail: float | None = None,
    delayed_verification: bool | None = None,
    offload: bool | None = None,
    use_triton: bool | None = None,
    use_cuda_graphs: bool | None = None,
    diagnostics: bool | None = None,
    check_finite: bool | None = None,
    sparsespec_config: SparseSpecConfig | None = None,
    **model_kwargs,
) -> torch.LongTensor | SparseSpecOutput:
    """Sparse self-speculative decoding as a transformers decoding method.

    Use it as ``model.generate(**inputs, custom_generate="sparsespec")`` (after ``import hf_sparsespec``)
    or ``custom_generate=hf_sparsespec.generate``. ``generate`` prepares the inputs, logits processors
    and stopping criteria as usual and hands them here. Greedy output is identical to plain greedy
    decoding, and sampled output has the same distribution.

    The SparseSpec parameters (``draft_len``, ``budget_ratio``, ``min_budget``, ``selection``, ...) are
    the fields of :class:`~hf_sparsespec.SparseSpecConfig`; pass them as ``generate`` keywords or
    bundle them in ``sparsespec_config``.

    Returns:
        ``(batch, prompt + new)`` token ids, padded after EOS, or with ``return_dict_in_generate=True``
        a :class:`SparseSpecOutput` carrying ``spec_stats``.
    """
    overrides = {
        name: value
        for name, value in locals().items()
        if name in SparseSpecConfig.field_names() and value is not None
    }
    config = replace(sparsespec_config or SparseSpecConfig(), **overrides)
    caller = _generate_frame_locals()
    streamer = caller.get("streamer")
    if caller.get("assistant_model") is not None:
        raise ValueError("SparseSpec drafts with the model itself: drop `assistant_model` (it cannot be combined).")
    return run_sparsespec(model, input_ids, logits_processor or [], stopping_criteria or [], generation_config, config, streamer, model_kwargs)


def _generate_frame_locals() -> dict:
    """Arguments of the calling ``GenerationMixin.generate`` that it does not forward to decoding methods.

    transformers drops ``streamer`` and ``assistant_model`` before calling a ``custom_generate``
    callable; reading them from the caller's frame keeps streaming working and lets us refuse an
    assistant instead of silently ignoring it.
    """
    frame = sys._getframe(2)
    if frame.f_code.co_name == "generate" and "generation_config" in frame.f_locals:
        return frame.f_locals
    return {}


def run_sparsespec(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    logits_processor: list,
    stopping_criteria: list,
    generation_config: Any,
    config: SparseSpecConfig,
    streamer: Any,
    model_kwargs: dict,
) -> torch.LongTensor | SparseSpecOutput:
    gc = generation_config
    attention_mask = model_kwargs.get("attention_mask")
    _check_call(model, gc, model_kwargs, streamer, input_ids)
    check_model_supported(model, gc.max_length)

    batch, width = input_ids.shape
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    if mask.shape != input_ids.shape:
        raise ValueError("`attention_mask` must have the shape of `input_ids`.")
    mask = mask.bool().cpu()
    ids_cpu = input_ids.cpu()
    left_padded = mask.long().cumsum(1) == torch.arange(1, width + 1) - (~mask).long().sum(1, keepdim=True)
    if not bool((left_padded | ~mask).all()):
        raise ValueError(
            "SparseSpec needs left-padded prompts (padding only before the first token). "
            "Set `tokenizer.padding_side = 'left'` before tokenizing."
        )

    max_length, eos_ids, custom_criteria = _read_stopping(stopping_criteria, gc)
    max_new = max_length - width
    requests = [
        Request(index=b, prompt=ids_cpu[b][mask[b]].tolist(), hf_prefix=ids_cpu[b], max_new_tokens=max_new)
        for b in range(batch)
    ]
    plan = LogitsPlan(list(logits_processor), do_sample=bool(gc.do_sample))

    stop_check = _CustomStop(custom_criteria, requests, input_ids.device, pads_finished_rows=bool(eos_ids))

    def on_commit(req: Request, tokens: list[int]) -> None:
        if tokens:
            streamer.put(torch.tensor(tokens, dtype=torch.long))

    engine = _engine_for(model, config, requests, max_length)
    original_attention = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        stats = engine.run(
            requests,
            plan,
            eos_ids,
            stop_check=stop_check if custom_criteria else None,
            on_commit=on_commit if streamer is not None else None,
            keep_scores=bool(gc.return_dict_in_generate and gc.output_scores),
            keep_logits=bool(gc.return_dict_in_generate and gc.output_logits),
            prompt_width=width,
        )
    finally:
        model.set_attn_implementation(original_attention)
        if streamer is not None:
            streamer.end()

    stop_check.trim(requests)
    pad = _pad_id(gc, eos_ids)
    longest = max(len(r.generated) for r in requests)
    new = torch.full((batch, longest), pad, dtype=torch.long)
    for r in requests:
        new[r.index, : len(r.generated)] = torch.tensor(r.generated, dtype=torch.long)
    sequences = torch.cat([ids_cpu, new], dim=1).to(input_ids.device)
    if not gc.return_dict_in_generate:
        return sequences
    return SparseSpecOutput(
        sequences=sequences,
        scores=_per_step(requests, "scores", longest) if gc.output_scores else None,
        logits=_per_step(requests, "logits", longest) if gc.output_logits else None,
        spec_stats=stats.as_dict(),
    )


def _check_call(model, gc, model_kwargs: dict, streamer, input_ids) -> None:
    if getattr(gc, "num_beams", 1) not in (None, 1):
        raise ValueError("SparseSpec does not do beam search: use num_beams=1 (or plain `generate` for beams).")
    if getattr(gc, "prompt_lookup_num_tokens", None) is not None or getattr(gc, "assistant_early_exit", None) is not None:
        raise ValueError(
            "SparseSpec is itself a speculative method: drop `prompt_lookup_num_tokens` / `assistant_early_exit`."
        )
    mode = gc.get_generation_mode()
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        raise ValueError(
            f"SparseSpec decodes greedily or by sampling, and this call asks for {mode.value.replace('_', ' ')}: "
            "unset the options that select it (`penalty_alpha`, `dola_layers`, `constraints`, `force_words_ids`, `use_mtp`)."
        )
    if gc.output_attentions or gc.output_hidden_states:
        raise ValueError(
            "SparseSpec runs packed, paged attention and cannot return attentions or hidden states: "
            "set output_attentions=False and output_hidden_states=False."
        )
    if streamer is not None and input_ids.shape[0] != 1:
        raise ValueError("Streaming supports batch size 1 (as transformers' streamers do).")
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError("SparseSpec starts from the prompt: pass no pre-filled cache (`past_key_values`).")
    unknown = sorted(k for k, v in model_kwargs.items() if k not in _PREPARED_KWARGS and v is not None)
    if unknown:
        raise ValueError(
            f"SparseSpec does not support these generate arguments: {unknown}. It decodes text-only causal LMs "
            "from `input_ids`: pass token ids (and `attention_mask`) instead, or use plain `generate`."
        )


class _CustomStop:
    """Custom stopping criteria with transformers' batch semantics.

    With an end-of-sequence token configured, transformers pads a row from the step a criterion
    stops it, so that row simply finishes. Without one, it keeps decoding stopped rows (their
    tokens are real, not padding) until every row has been stopped once, and ends all rows at that
    step. Rows here advance at different speeds, so a stopped row runs on; once the last row is
    stopped, every row is held to the length at which the latest-stopped one was stopped.
    """

    def __init__(self, criteria: list, requests: list[Request], device: torch.device, pads_finished_rows: bool) -> None:
        self.criteria, self.requests, self.device = criteria, requests, device
        self.together = not pads_finished_rows and not any(hasattr(c, "eos_token_id") for c in criteria) and len(requests) > 1
        self.stopped_at: dict[int, int] = {}  # row -> generated tokens when a criterion first held
        self.final_length: int | None = None

    def __call__(self, req: Request) -> bool:
        if self.final_length is not None:
            return len(req.generated) >= self.final_length
        if req.index in self.stopped_at:
            return False  # stays stopped in transformers too; nothing to evaluate
        ids = torch.cat([req.hf_prefix, torch.tensor(req.generated, dtype=torch.long)])[None].to(self.device)
        if not any(bool(c(ids, None).any()) for c in self.criteria):
            return False
        if not self.together:
            return True
        self.stopped_at[req.index] = len(req.generated)
        if len(self.stopped_at) < len(self.requests):
            return False
        self.final_length = max(self.stopped_at.values())
        for other in self.requests:
            other.max_new_tokens = min(other.max_new_tokens, self.final_length)
        return len(req.generated) >= self.final_length

    def trim(self, requests: list[Request]) -> None:
        """Drop tokens that rows which ran ahead produced past the common end."""
        if self.final_length is None:
            return
        for r in requests:
            del r.generated[self.final_length :], r.scores[self.final_length :], r.logits[self.final_length :]


def _read_stopping(criteria: list, gc) -> tuple[int, set[int], list]:
    max_length = gc.max_length
    eos = gc._eos_token_tensor if getattr(gc, "_eos_token_tensor", None) is not None else gc.eos_token_id
    eos_ids = set(torch.as_tensor(eos).view(-1).tolist()) if eos is not None else set()
    custom = []
    for c in criteria:
        if isinstance(c, sc.MaxLengthCriteria):
            max_length = min(max_length, c.max_length)
        elif isinstance(c, sc.EosTokenCriteria):
            eos_ids |= set(c.eos_token_id.view(-1).tolist())
        else:
            custom.append(c)
    return max_length, eos_ids, custom


def _pad_id(gc, eos_ids: set[int]) -> int:
    pad = getattr(gc, "_pad_token_tensor", None)
    if pad is None:
        pad = gc.pad_token_id
    if pad is not None:
        return int(torch.as_tensor(pad).view(-1)[0])
    return min(eos_ids) if eos_ids else 0


def _per_step(requests: list[Request], field_name: str, steps: int) -> tuple[torch.Tensor, ...]:
    """transformers' layout: one (batch, vocab) tensor per step; steps past a row's end are zeros."""
    rows = [getattr(r, field_name) for r in requests]
    vocab = next(len(x[0]) for x in rows if x)
    out = []
    for t in range(steps):
        step = torch.zeros(len(rows), vocab)
        for b, values in enumerate(rows):
            if t < len(values):
                step[b] = values[t].cpu()
        out.append(step)
    return tuple(out)


def _engine_for(model: torch.nn.Module, config: SparseSpecConfig, requests: list[Request], max_length: int) -> Engine:
    """The model's engine, rebuilt only when the call needs other buffers, so graphs and pools persist."""
    text = model.config.get_text_config()
    num_heads = text.num_attention_heads
    num_kv_heads = getattr(text, "num_key_value_heads", None) or num_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    slots = min(config.max_batch_size, len(requests))
    pool_tokens = config.kv_pool_tokens or _default_pool_tokens(config, requests, max_length, text, num_kv_heads, head_dim, dtype, device)
    num_pages = -(-pool_tokens // config.page_size)
    cached = _ENGINES.get(model)
    if (
        cached is not None
        and cached.config == config
        and cached.cache.num_pages >= num_pages
        and cached.num_slots >= slots
        and cached.max_context >= max_length
        and cached.cache.dtype == dtype
        and cached.cache.device == device
    ):
        return cached
    _ENGINES.pop(model, None)  # free the old pool before allocating a new one
    cache = PagedKVCache(
        num_layers=text.num_hidden_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        num_pages=num_pages,
        page_size=config.page_size,
        dtype=dtype,
        device=device,
    )
    engine = Engine(model, config, cache, num_slots=slots, max_context=max_length)
    _ENGINES[model] = engine
    return engine


def _default_pool_tokens(config, requests, max_length, text, num_kv_heads, head_dim, dtype, device) -> int:
    per_request = max_length + config.draft_len + config.page_size
    wanted = per_request * min(config.max_batch_size, len(requests))
    if device.type != "cuda":
        return wanted
    free, _ = torch.cuda.mem_get_info(device)
    bytes_per_token = 2 * text.num_hidden_layers * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()
    affordable = int(free * config.kv_memory_fraction) // bytes_per_token
    return max(min(wanted, affordable), per_request)
