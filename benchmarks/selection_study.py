"""Screen of candidate draft-selection rules through the real engine (the data behind docs/selection.md).

Each candidate is a set of knobs of ``selection.pillar_priority`` (and, for a few, a different way
of turning the verification's attention into scores); the engine's ``select_tokens`` is swapped for
the candidate during its run, so drafting, verification and acceptance are exactly the engine's.

Why not something cheaper: a teacher-forced replay along the full model's trajectory (tried first)
reproduces the engine round for round for position-only rules such as "window", but not for
score-driven ones. The engine verifies the drafted tokens, and after the first rejection those are
wrong tokens whose attention makes poor scores; along the true trajectory the raw Top-K rule looked
2.4x better (3.1 vs 1.3 accepted, 2k greedy) than it is.

    PYTHONPATH=. python benchmarks/selection_study.py --grid shape --context 1024 --out results.json
    PYTHONPATH=. python benchmarks/selection_study.py --grid oracle --only oracle --context 8192 --ratio 0.1 --prompts 8 --temperature 0.6 --out oracle.json
    PYTHONPATH=. python3 benchmarks/selection_study.py --device cuda --grid block --context 8192 --prompts 64 --out $OUT/block.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import hf_sparsespec  # noqa: E402
from benchmarks.prompts import held_out_prompts  # noqa: E402
from hf_sparsespec.attention import reference  # noqa: E402
from hf_sparsespec.attention import selection as sel  # noqa: E402
from hf_sparsespec.generation import engine as engine_module  # noqa: E402

BENCH_MODEL = ROOT / "hf_sparsespec" / "models" / "bench-code-lm"


def knobs(back, ahead, recent, sinks=0, block=1, **extra):
    return dict(lookback=back, lookahead=ahead, recent_fraction=recent, sinks=sinks, block=block, **extra)


GRIDS = {
    "named": {"paper": "paper", "window": "window", "pillar": "pillar"},
    # Pooling width and shape, recent share, sinks.
    "shape": {
        "window": "window",
        "pool7+recent0.5": knobs(3, 3, 0.5),
        "pool15+recent0.25": knobs(7, 7, 0.25),
        "pool15+recent0.5": knobs(7, 7, 0.5),
        "back8ahead1+recent0.25": knobs(8, 1, 0.25),
        "back8ahead1+recent0.5": knobs(8, 1, 0.5),
        "back16ahead2+recent0.25": knobs(16, 2, 0.25),
        "pool7+recent0.5+sink4": knobs(3, 3, 0.5, 4),
        "pool7": knobs(3, 3, 0.0),
        "recent0.5": knobs(0, 0, 0.5),
    },
    # How the verification's queries are weighted into scores (the engine averages all k+1; after
    # the first rejection they are wrong tokens). Needs a kernel change, so only worth it if it pays.
    "final": {
        "window": "window",
        "pool7+recent0.5": knobs(3, 3, 0.5),
        "pool15+recent0.25": knobs(7, 7, 0.25),
        "back8ahead1+recent0.25": knobs(8, 1, 0.25),
        "pool11+recent0.25": knobs(5, 5, 0.25),
        "pool7+recent0.5+first": knobs(3, 3, 0.5, score_weights="first"),
        "pool15+recent0.25+first": knobs(7, 7, 0.25, score_weights="first"),
    },
    # Around the best of "final": how far forward to pool, how much recent window.
    "final2": {
        "window": "window",
        "pool7+recent0.5": knobs(3, 3, 0.5),
        "back8ahead1+recent0.25": knobs(8, 1, 0.25),
        "back8ahead1+recent0.5": knobs(8, 1, 0.5),
        "back16ahead1+recent0.25": knobs(16, 1, 0.25),
        "back4ahead1+recent0.25": knobs(4, 1, 0.25),
        "back8ahead1+recent0.125": knobs(8, 1, 0.125),
        "back8ahead0+recent0.25": knobs(8, 0, 0.25),
        "back16ahead1+recent0.5": knobs(16, 1, 0.5),
        "back24ahead1+recent0.25": knobs(24, 1, 0.25),
        "back12ahead1+recent0.25": knobs(12, 1, 0.25),
    },
    # Score memory across rounds: a position keeps max(new score, decay * its previous score).
    "accumulate": {
        "back8ahead1+recent0.5": knobs(8, 1, 0.5),
        "back8ahead1+recent0.5+acc0.7": knobs(8, 1, 0.5, accumulate=0.7),
        "back8ahead1+recent0.5+acc0.9": knobs(8, 1, 0.5, accumulate=0.9),
    },
    # At 4k (once prefill became cheap on the CPU): the default against its nearest neighbours.
    "cpu4k": {
        "window": "window",
        "back8ahead1+recent0.5": knobs(8, 1, 0.5),
        "back8ahead1+recent0.25": knobs(8, 1, 0.25),
        "pool7+recent0.5": knobs(3, 3, 0.5),
        "back16ahead1+recent0.5": knobs(16, 1, 0.5),
    },
    # A larger recent share (at 5% the plain window matched the default at 4k).
    "recent": {
        "window": "window",
        "back8ahead1+recent0.5": knobs(8, 1, 0.5),
        "back8ahead1+recent0.75": knobs(8, 1, 0.75),
        "back8ahead1+recent0.25": knobs(8, 1, 0.25),
        # Little or no forced window: local heads fill their budget with recent positions by score,
        # retrieval heads with far pillars (a per-head split of the budget, for free).
        "back8ahead1+recent0.125": knobs(8, 1, 0.125),
        "back8ahead1+recent0": knobs(8, 1, 0.0),
    },
    # Does acceptance hinge on particular layers' sparsity? Default pillar selection, but in the
    # listed layers the draft rows read every cached position ("dense"), or no selected position,
    # only their tail ("tail_only"). Layer 0's attention is diffuse (~0.2 of its mass captured).
    "layers": {
        "pillar": "pillar",
        "pillar + dense layer 0": dict(policy="pillar", dense=[0]),
        "pillar + dense layers 0-1": dict(policy="pillar", dense=[0, 1]),
        "pillar + dense last layer": dict(policy="pillar", dense=[7]),
        "pillar, layer 0 tail only": dict(policy="pillar", tail_only=[0]),
    },
    # Block-granular scores (pillar_priority's ``block``): each position scores its aligned block's
    # attention mass, which the kernels sum inside the attention pass instead of re-reading K in a
    # score pass. "block16+pool" is selection="pillar_block".
    "block": {
        "window": "window",
        "pillar": knobs(8, 1, 0.5),
        "block16": knobs(0, 0, 0.5, block=16),
        "block16+pool": knobs(8, 1, 0.5, block=16),
        "block8": knobs(0, 0, 0.5, block=8),
        "block8+pool": knobs(8, 1, 0.5, block=8),
        # With the tensor-core block sums pillar_block costs less than pillar on the H200: does it
        # reach 1.15x window at 10%, where a smaller forced window helped single positions?
        "block16+pool+recent0": knobs(8, 1, 0.0, block=16),
        "block16+pool+recent0.25": knobs(8, 1, 0.25, block=16),
        "block8+pool+recent0": knobs(8, 1, 0.0, block=8),
        "block16+back16ahead1+recent0": knobs(16, 1, 0.0, block=16),
        "block16+prev": knobs(0, 0, 0.5, block_lookback=(16, 1)),
        # The attention kernel's own KV block (64 positions; 32 for head dims past 128) is what it
        # could sum with no extra work: the row sums of each block's probabilities exist already.
        "block32+pool": knobs(8, 1, 0.5, block=32),
        "block64+pool": knobs(8, 1, 0.5, block=64),
    },
    # Budgets moved between layers at equal total read: layer l selects count * w_l / mean(w). The
    # layer screen found a dense last layer worth the most (+1.0 at 5%), layer 0 diffuse.
    "layer_budgets": {
        "pillar": knobs(8, 1, 0.5),
        "last x2": knobs(8, 1, 0.5, layer_weights=[1, 1, 1, 1, 1, 1, 1, 2]),
        "last x3": knobs(8, 1, 0.5, layer_weights=[1, 1, 1, 1, 1, 1, 1, 3]),
        "layers 3, 7 x2": knobs(8, 1, 0.5, layer_weights=[1, 1, 1, 2, 1, 1, 1, 2]),
        "block16+pool+recent0, layers 3, 7 x2": knobs(8, 1, 0.0, block=16, layer_weights=[1, 1, 1, 2, 1, 1, 1, 2]),
    },
    # A diagnostic, not a policy: in every layer each draft row reads the ``count`` positions (below
    # its tail) that hold the most of its own full causal attention, per KV head, recomputed inside
    # each draft step's attention: the most mass a selection of that budget can capture. It reads the
    # whole cache, so it saves nothing. (It accepts less than "window" at 8k/10%: captured mass is no
    # ceiling on acceptance; docs/selection.md.) The other three are the block grid's "window",
    # "pillar" and "block16+pool+recent0" (selection="pillar_block"'s rule).
    "oracle": {
        "window": "window",
        "pillar": knobs(8, 1, 0.5),
        "pillar_block": knobs(8, 1, 0.0, block=16),
        "oracle": dict(policy="window", oracle=True),
    },
    "scores": {
        "pool7+recent0.5": knobs(3, 3, 0.5),
        "pool7+recent0.5+first": knobs(3, 3, 0.5, score_weights="first"),
        "pool7+recent0.5+decay0.7": knobs(3, 3, 0.5, score_weights=0.7),
        "pool7+recent0.5+last": knobs(3, 3, 0.5, score_weights="last"),
        "paper+first": dict(paper=True, score_weights="first"),
    },
}


def best_block_of_last(scores: torch.Tensor, block: int, lookback: int) -> torch.Tensor:
    """Each position scored by the largest block mass among its block and the ``lookback`` before it."""
    n = scores.shape[-1]
    masses = sel.block_masses(scores, block)
    flat = torch.nn.functional.pad(masses.flatten(0, -2).unsqueeze(1), (lookback, 0), value=float("-inf"))
    best = torch.nn.functional.max_pool1d(flat, lookback + 1, stride=1).view_as(masses)
    return best.repeat_interleave(block, dim=-1)[..., :n]


def query_weights(rule, n: int) -> torch.Tensor:
    if rule == "first":
        w = torch.zeros(n)
        w[0] = 1.0
    elif rule == "last":
        w = torch.zeros(n)
        w[-1] = 1.0
    else:
        w = rule ** torch.arange(n, dtype=torch.float32)
    return w / w.sum()


def reference_with_score_weights(rule):
    """The reference attention, with verification scores weighted over queries by ``rule``."""

    def attention(query, k_pool, v_pool, ctx, layer, scaling):
        out = reference.reference_attention(query, k_pool, v_pool, ctx, layer, scaling)
        scores = ctx.scores  # rewritten below for verification rows
        if scores is None:
            return out
        q = query[0].transpose(0, 1)
        hkv = k_pool.shape[1]
        for row in range(ctx.num_rows):
            score_row = int(ctx.score_row[row])
            if score_row < 0:
                continue
            n, start, kv_len = int(ctx.q_len[row]), int(ctx.q_start[row]), int(ctx.kv_len[row])
            positions = torch.arange(kv_len)
            keys = reference.gather_positions(k_pool, ctx.block_tables[row], positions, ctx.cache.page_size).float()
            q_row = q[start : start + n].float().view(n, hkv, -1, q.shape[-1])
            logits = torch.einsum("nhgd,lhd->hgnl", q_row, keys) * scaling
            causal = positions[None, :] <= torch.arange(kv_len - n, kv_len)[:, None]
            probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
            scores[score_row, layer, :, :kv_len] = torch.einsum("hgnl,n->hl", probs, query_weights(rule, n)) / probs.shape[1]
        return out

    return attention


def oracle_selection(query, k_pool, ctx, layer, scaling) -> torch.Tensor:
    """``ctx.selection`` with layer ``layer`` of every draft row's slot replaced by the oracle's choice.

    For a draft row (one query: drafts run one token a row), per KV head: the ``sel_count[slot]``
    positions below ``tail_start`` with the most of that query's full causal softmax probability,
    averaged over the query heads of the group (``selection.top_positions``, so ties and layout are
    the engine's). The engine's own tensor is not written.
    """
    selection = ctx.selection.clone()
    q = query[0].transpose(0, 1)  # [T, Hq, D]
    hkv, width = k_pool.shape[1], selection.shape[-1]
    slots = set()
    for row in range(ctx.num_rows):
        if not bool(ctx.is_draft[row]) or int(ctx.q_len[row]) == 0:
            continue
        start, n, kv_len = int(ctx.q_start[row]), int(ctx.q_len[row]), int(ctx.kv_len[row])
        slot, tail = int(ctx.sel_slot[row]), int(ctx.tail_start[row])
        if n != 1 or slot in slots:
            raise ValueError(f"the oracle expects one query per draft row and one draft row per slot (row {row}: {n} queries, slot {slot})")
        slots.add(slot)
        positions = torch.arange(kv_len, device=q.device)
        keys = reference.gather_positions(k_pool, ctx.block_tables[row], positions, ctx.cache.page_size).float()
        q_row = q[start].float().view(hkv, -1, q.shape[-1])  # [H, g, D]; its position is kv_len - 1: all causal
        probs = torch.softmax(torch.einsum("hgd,lhd->hgl", q_row, keys) * scaling, dim=-1).mean(1)  # [H, kv_len]
        priority = probs.masked_fill(positions[None, :] >= tail, float("-inf"))
        count = ctx.sel_count[slot : slot + 1].long()
        selection[slot, layer] = sel.top_positions(priority[None, None], count, width)[0, 0].to(selection.dtype)
    return selection


def reference_with_layer_views(dense, tail_only, oracle=False):
    """The reference attention with draft rows dense in layers ``dense`` and tail-only in ``tail_only``,
    and (``oracle``) reading ``oracle_selection`` in the others.

    Only the view passed to the reference changes (the engine's own tensors are untouched), and only
    for the listed layers. Dense: no row counts as a draft, so draft rows attend causally to their
    whole cache like full rows. Tail only: no slot has selected positions (``visible_positions_mask``
    reads ``sel_count``), so draft rows see just their positions from ``tail_start`` on: what the
    last verification committed plus this round's drafts. Selection mass is not recorded for dense
    layers (no sparse row there): their per-layer entry reads 0.
    """

    def attention(query, k_pool, v_pool, ctx, layer, scaling):
        if layer in dense:
            ctx = dataclasses.replace(ctx, is_draft=torch.zeros_like(ctx.is_draft))
        elif layer in tail_only:
            ctx = dataclasses.replace(ctx, sel_count=torch.zeros_like(ctx.sel_count))
        elif oracle and bool(ctx.is_draft.any()):
            ctx = dataclasses.replace(ctx, selection=oracle_selection(query, k_pool, ctx, layer, scaling))
        return reference.reference_attention(query, k_pool, v_pool, ctx, layer, scaling)

    return attention


def layer_budget_selection(scores, old_len, count, width, shares, spec):
    """Pillar selection with layer l taking ``floor(count * shares[l])`` positions. The kernels and the
    reference read one count per request, so a layer's unused entries repeat its first position
    (the reference's visibility mask counts a position once)."""
    layers = []
    for layer, share in enumerate(shares.tolist()):
        layer_count = torch.floor(count.to(torch.float32) * share).long()
        chosen = sel.top_positions(sel.pillar_priority(scores[:, layer : layer + 1], old_len, layer_count, **spec),
                                   layer_count, width)
        column = torch.arange(width, device=count.device)[None, :]
        spare = (column >= layer_count[:, None]) & (column < count[:, None])
        chosen = torch.where(spare[:, None, None, :], chosen[..., :1], chosen)
        layers.append(chosen)
    return torch.cat(layers, dim=1)


class Candidate:
    """Swaps the engine's selection (and optionally the score rule or per-layer views) for one run."""

    def __init__(self, spec) -> None:
        self.spec = spec

    def __enter__(self):
        from hf_sparsespec.attention import interface

        self._select = engine_module.select_tokens
        self._attention = interface.reference_attention
        spec = self.spec
        if isinstance(spec, dict) and "policy" in spec:
            # The CPU engine calls the reference through interface's name, so that is what is swapped.
            dense, tail_only = set(spec.get("dense", ())), set(spec.get("tail_only", ()))
            interface.reference_attention = reference_with_layer_views(dense, tail_only, spec.get("oracle", False))
            spec = spec["policy"]
        if isinstance(spec, dict) and "score_weights" in spec:
            spec = dict(spec)
            interface.reference_attention = reference_with_score_weights(spec.pop("score_weights"))
            if spec.pop("paper", False):
                spec = "paper"
        if isinstance(spec, dict):
            spec = dict(spec)
        weights = spec.pop("layer_weights", None) if isinstance(spec, dict) else None
        # The engine's count is for the layer with the largest weight; each layer keeps its share.
        self.ratio_scale = 1.0
        if weights is not None:
            weights = torch.tensor(weights, dtype=torch.float32)
            weights = weights / weights.mean()
            self.ratio_scale = float(weights.max())
        decay = spec.pop("accumulate", None) if isinstance(spec, dict) else None
        block_lookback = spec.pop("block_lookback", None) if isinstance(spec, dict) else None
        if decay is not None:
            self._verify = engine_module.Engine._verify
            memory: dict[int, torch.Tensor] = {}  # slot -> [L, H, N] remembered scores
            current = {}

            def verify(engine, v, scores, attn_scores):
                current["slots"] = v["v_slot"].tolist()
                return self._verify(engine, v, scores, attn_scores)

            def remember(scores):
                out = scores.clone()
                for i, slot in enumerate(current["slots"]):
                    old = memory.get(slot)
                    if old is not None:
                        n = min(old.shape[-1], out.shape[-1])
                        out[i, ..., :n] = torch.maximum(out[i, ..., :n], decay * old[..., :n])
                    memory[slot] = out[i].clone()
                return out

            engine_module.Engine._verify = verify
        else:
            remember = None
        if isinstance(spec, str):
            engine_module.select_tokens = lambda s, o, c, p, w, **kw: sel.select_tokens(s, o, c, spec, w, **kw)
        else:
            def select(scores, old_len, count, policy, width, **kwargs):
                if remember is not None:
                    scores = remember(scores)
                if block_lookback is not None:
                    scores = best_block_of_last(scores, *block_lookback)
                if weights is not None:
                    return layer_budget_selection(scores, old_len, count, width, weights / weights.max(), spec)
                return sel.top_positions(sel.pillar_priority(scores, old_len, count, **spec), count, width)

            engine_module.select_tokens = select
        return self

    def __exit__(self, *exc):
        from hf_sparsespec.attention import interface

        engine_module.select_tokens = self._select
        interface.reference_attention = self._attention
        if hasattr(self, "_verify"):
            engine_module.Engine._verify = self._verify


def run(model, prompts, spec, temperature, k, ratio, min_budget, new_tokens, seed=0, plain_tail=None):
    device = next(model.parameters()).device
    ids = torch.stack(prompts).to(device)
    torch.manual_seed(seed)
    # On CUDA: the Triton kernels, without CUDA graphs (a captured step would keep the first
    # candidate's selection) and without the mass diagnostic (it needs the reference attention).
    on_cpu = device.type == "cpu"
    with Candidate(spec) as candidate:
        ratio *= candidate.ratio_scale
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), custom_generate=hf_sparsespec.generate,
            return_dict_in_generate=True, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=temperature > 0, temperature=temperature or None, top_k=0 if temperature > 0 else None,
            selection="paper", budget_ratio=ratio, min_budget=min_budget, draft_len=k, diagnostics=on_cpu,
            unified_schedule=False, **({} if on_cpu else dict(use_cuda_graphs=False)),
            **({} if plain_tail is None else dict(plain_tail=plain_tail)),
        )
    stats = out.spec_stats
    mass = stats.get("selection_mass_per_layer") or []
    return stats["mean_accepted"], mass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default="shape")
    ap.add_argument("--only", nargs="*", help="candidates of the grid to run (default: all)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--draft-len", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=0.05)
    ap.add_argument("--min-budget", type=int, default=16)
    ap.add_argument("--temperature", type=float, nargs="+", default=[0.6, 0.0])
    ap.add_argument("--seed", type=int, nargs="+", default=[0], help="sampling seeds; each is a separate row")
    ap.add_argument("--plain-tail", type=float, default=None,
                    help="the engine's plain_tail (default: the library's); 0 speculates to the end, as every screen "
                         "before 77e73b5 did")
    ap.add_argument("--late-drafts", action="store_true",
                    help="Engine.EARLY_DRAFTS = False: a verified request sits out the next iteration, as before session 13")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cpu", help="cuda: bf16 and the Triton kernels, for many prompts at long contexts")
    args = ap.parse_args()
    torch.set_num_threads(1)
    engine_module.Engine.EARLY_DRAFTS = not args.late_drafts
    tok = AutoTokenizer.from_pretrained(BENCH_MODEL)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(BENCH_MODEL, dtype=dtype).to(args.device).eval()
    prompts = held_out_prompts(tok, args.context, args.prompts)
    grid = GRIDS[args.grid]
    names = args.only or list(grid)
    if args.device != "cpu":
        swapped = [n for n in names if isinstance(grid[n], dict) and ("policy" in grid[n] or "score_weights" in grid[n])]
        if swapped:
            raise SystemExit(f"{swapped} swap the reference attention, which only the CPU runs; use --device cpu for them.")
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    plain_tail = hf_sparsespec.SparseSpecConfig().plain_tail if args.plain_tail is None else args.plain_tail
    started = time.time()
    for temperature, seed, name in itertools.product(args.temperature, args.seed, names):
        accepted, mass = run(model, prompts, grid[name], temperature, args.draft_len, args.ratio, args.min_budget,
                             args.new_tokens, seed, args.plain_tail)
        rows.append(dict(candidate=name, spec=grid[name], device=args.device, context=args.context, temperature=temperature, seed=seed,
                         draft_len=args.draft_len, budget_ratio=args.ratio, min_budget=args.min_budget,
                         prompts=args.prompts, new_tokens=args.new_tokens, plain_tail=plain_tail,
                         early_drafts=engine_module.Engine.EARLY_DRAFTS, mean_accepted=accepted,
                         selection_mass=sum(mass) / len(mass) if mass else None, selection_mass_per_layer=mass))
        args.out.write_text(json.dumps(rows, indent=1))
        print(f"[{time.time() - started:5.0f}s] T={temperature} seed={seed} {name:28s} accepted {accepted:.2f} "
              f"mass {rows[-1]['selection_mass'] or 0:.3f}", flush=True)


if __name__ == "__main__":
    main()
