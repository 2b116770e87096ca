"""Teacher-forced screen of draft-selection policies: many policies per minute on a CPU.

The engine (``benchmarks/acceptance.py``) gives the real numbers, but on a 2-core CPU one engine
run per (policy, budget, draft length, temperature) costs minutes. This script replays SparseSpec's
rounds along a fixed trajectory instead, with two forwards per policy:

1. A full-attention forward over prompt + trajectory records every layer's K/V and the attention
   probabilities of the trajectory's queries (what verification rows would write as scores).
2. A forward of the trajectory tokens only, in which each draft query attends to its round's
   selection plus the tail, exactly as a draft row does: positions written in its own round use the
   K/V this sparse pass computes, older positions use the full-attention K/V (as after a
   verification). The draft's logits at each query are then compared with the full model's.

Rounds have a fixed stride of ``draft_len + 1`` (every round accepted in full; real rounds are
shorter, which shortens the tail a little). Greedy acceptance is the leading run of argmax matches;
sampled acceptance is the expectation ``sum_j prod_{i<=j} (1 - TV(p_draft_i, p_target_i))``.
Along a teacher-forced prefix both are what speculative decoding accepts, up to the stride.

Also reported: the attention mass the selection plus tail captures for the draft queries (full
attention probabilities of pass 1), averaged over heads, queries and layers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.prompts import held_out_prompts  # noqa: E402
from hf_sparsespec.attention import selection as sel  # noqa: E402

BENCH_MODEL = ROOT / "hf_sparsespec" / "models" / "bench-code-lm"
PROBE = "selection_probe"


@dataclass
class Probe:
    mode: str = "full"
    prompt_len: int = 0
    full_k: dict | None = None  # layer -> [Hkv, N, D]
    full_v: dict | None = None
    gen_probs: dict | None = None  # layer -> [Hq, G, N] full-attention probabilities of trajectory queries
    visible: torch.Tensor | None = None  # [L, Hkv, G, N] bool, sparse pass only
    own_round: torch.Tensor | None = None  # [G, G] bool: key j was written in query i's round (sparse K/V)


probe = Probe()


def probe_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    layer = module.layer_idx
    q = query[0].float()  # [Hq, n, D]
    hq, n, d = q.shape
    hkv = key.shape[1]
    g = hq // hkv
    scale = scaling if scaling is not None else d**-0.5
    if probe.mode == "full":
        k, v = key[0].float(), value[0].float()
        probe.full_k[layer], probe.full_v[layer] = k, v
        kr, vr = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
        out = F.scaled_dot_product_attention(q[None], kr[None], vr[None], is_causal=True, scale=scale)[0]
        p0 = probe.prompt_len
        logits = torch.einsum("hnd,hmd->hnm", q[:, p0:], kr) * scale
        causal = torch.arange(n)[None, :] <= torch.arange(p0, n)[:, None]
        probe.gen_probs[layer] = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
        return out.transpose(0, 1)[None].to(query.dtype), None
    # Sparse pass over the trajectory only: queries and keys are positions P..N-1.
    kf, vf = probe.full_k[layer], probe.full_v[layer]  # [Hkv, N, D]
    p0 = probe.prompt_len
    qg = q.view(hkv, g, n, d)
    ks, vs = key[0].float(), value[0].float()  # [Hkv, n, D], computed from draft hidden states
    lf = torch.einsum("hgnd,hmd->hgnm", qg, kf) * scale  # [Hkv, g, n, N]
    ls = torch.einsum("hgnd,hmd->hgnm", qg, ks) * scale  # [Hkv, g, n, n]
    own = probe.own_round  # [n, n]
    tail = lf[..., p0:]
    lf = torch.cat([lf[..., :p0], torch.where(own, ls, tail)], dim=-1)
    vis = probe.visible[layer][:, None]  # [Hkv, 1, n, N]
    probs = torch.softmax(lf.masked_fill(~vis, float("-inf")), -1)
    pt = probs[..., p0:]
    out = (
        torch.einsum("hgnm,hmd->hgnd", probs[..., :p0], vf[:, :p0])
        + torch.einsum("hgnm,hmd->hgnd", torch.where(own, pt, 0.0), vs)
        + torch.einsum("hgnm,hmd->hgnd", torch.where(own, 0.0, pt), vf[:, p0:])
    )
    return out.reshape(hq, n, d).transpose(0, 1)[None].to(query.dtype), None


AttentionInterface.register(PROBE, probe_attention)


@dataclass
class Trajectory:
    ids: torch.Tensor  # [N] prompt + generated
    prompt_len: int
    full_logits: torch.Tensor  # [G, V] full-attention logits at trajectory positions
    gen_probs: dict  # layer -> [Hq, G, N]
    full_k: dict
    full_v: dict


def make_trajectory(model, prompt_ids: torch.Tensor, new_tokens: int, temperature: float, seed: int) -> Trajectory:
    model.set_attn_implementation("sdpa")
    torch.manual_seed(seed)
    with torch.no_grad():
        gen = model.generate(
            prompt_ids[None],
            attention_mask=torch.ones_like(prompt_ids[None]),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_k=None,
            top_p=None,
        )[0]
    probe.mode, probe.prompt_len = "full", len(prompt_ids)
    probe.full_k, probe.full_v, probe.gen_probs = {}, {}, {}
    model.set_attn_implementation(PROBE)
    with torch.no_grad():
        logits = model(gen[None]).logits[0, len(prompt_ids) :].float()
    return Trajectory(gen, len(prompt_ids), logits, probe.gen_probs, probe.full_k, probe.full_v)


def verification_scores(traj: Trajectory, starts: list[int], k: int, num_kv_heads: int) -> torch.Tensor:
    """[R, L, H, N] what verification rows write: probabilities averaged over each KV group and the k+1 queries."""
    p0 = traj.prompt_len
    out = []
    for layer in sorted(traj.gen_probs):
        probs = traj.gen_probs[layer]  # [Hq, G, N]
        hq = probs.shape[0]
        grouped = probs.view(num_kv_heads, hq // num_kv_heads, *probs.shape[1:]).mean(1)  # [H, G, N]
        out.append(torch.stack([grouped[:, s - p0 : s - p0 + k + 1].mean(1) for s in starts]))  # [R, H, N]
    return torch.stack(out, 1)


def choose(scores, old_len, count, policy, state=None):
    """Selected positions [R, L, H, width]; ``policy`` a name of selection.py or a dict of pillar knobs."""
    width = int(count.max())
    if isinstance(policy, str):
        return sel.select_tokens(scores, old_len, count, policy, width)
    priority = sel.pillar_priority(scores, old_len, count, **policy)
    return sel.top_positions(priority, count, width)


def evaluate(model, traj: Trajectory, k: int, ratio: float, min_budget: int, policy, temperature: float, accumulate: float = 0.0):
    text = model.config.get_text_config()
    num_layers, hkv = text.num_hidden_layers, text.num_key_value_heads
    p0, n = traj.prompt_len, len(traj.ids)
    g = n - p0
    stride = k + 1
    starts = list(range(p0, n - k, stride))  # round r verifies positions starts[r] .. starts[r] + k
    if len(starts) < 2:
        raise ValueError("trajectory too short for two rounds")
    scores = verification_scores(traj, starts[:-1], k, hkv)  # selection for round r comes from round r-1
    if accumulate > 0:
        # Persistent per-position score: max of this round's score and the decayed previous one.
        acc = scores.clone()
        for r in range(1, acc.shape[0]):
            acc[r] = torch.maximum(acc[r], accumulate * acc[r - 1])
        scores = acc
    old_len = torch.tensor(starts[:-1])
    count = torch.tensor([min(max(min_budget, math.ceil(ratio * s)), s) for s in starts[:-1]])
    chosen = choose(scores, old_len, count, policy)  # [R-1, L, H, W]
    visible = torch.ones(num_layers, hkv, g, n, dtype=torch.bool)
    visible &= torch.arange(n)[None, :] <= torch.arange(p0, n)[:, None]
    own = torch.zeros(g, g, dtype=torch.bool)
    draft_q = []  # (round, query index into G)
    for r in range(1, len(starts)):
        c, tail = starts[r], starts[r - 1]
        rows = slice(c - p0, c - p0 + k)
        # Padding (-1) goes to a spare column, so it cannot clear a selected position.
        mask = torch.zeros(num_layers, hkv, n + 1, dtype=torch.bool)
        picked = chosen[r - 1].long()
        mask.scatter_(2, torch.where(picked >= 0, picked, n), True)
        mask = mask[..., :n]
        mask[..., tail:] = True
        visible[:, :, rows] = mask[:, :, None, :] & visible[:, :, rows]
        for j in range(k):
            i = c - p0 + j
            own[i, c - p0 : i + 1] = True
            draft_q.append((r, i))
    probe.mode, probe.visible, probe.own_round, probe.prompt_len = "sparse", visible, own, p0
    probe.full_k, probe.full_v = traj.full_k, traj.full_v
    with torch.no_grad():
        draft_logits = model(traj.ids[None, p0:], position_ids=torch.arange(p0, n)[None]).logits[0].float()
    idx = torch.tensor([i for _, i in draft_q])
    if temperature > 0:
        pd = torch.softmax(draft_logits[idx] / temperature, -1)
        pf = torch.softmax(traj.full_logits[idx] / temperature, -1)
        alpha = torch.minimum(pd, pf).sum(-1)
    else:
        alpha = (draft_logits[idx].argmax(-1) == traj.full_logits[idx].argmax(-1)).float()
    alpha = alpha.view(-1, k)
    accepted = torch.cumprod(alpha, 1).sum(1)  # per round
    # Captured attention mass of the draft queries, from the full-attention probabilities.
    mass = []
    for layer in range(num_layers):
        probs = traj.gen_probs[layer][:, idx]  # [Hq, Q, N]
        vis = visible[layer][:, idx].repeat_interleave(probs.shape[0] // hkv, 0)
        mass.append(float((probs * vis).sum(-1).mean()))
    return float(accepted.mean()), mass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, nargs="+", default=[2048])
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--draft-len", type=int, nargs="+", default=[8])
    ap.add_argument("--ratio", type=float, nargs="+", default=[0.05])
    ap.add_argument("--min-budget", type=int, default=16)
    ap.add_argument("--temperature", type=float, nargs="+", default=[0.0, 0.6])
    ap.add_argument("--grid", default="main", help="which set of policies to screen")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "selection_study.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(BENCH_MODEL)
    model = AutoModelForCausalLM.from_pretrained(BENCH_MODEL, dtype=torch.float32).eval()
    policies = GRIDS[args.grid]
    rows = []
    started = time.time()
    for context in args.context:
        prompts = held_out_prompts(tok, context, args.prompts)
        for temperature in args.temperature:
            for pi, prompt in enumerate(prompts):
                traj = make_trajectory(model, prompt, args.new_tokens, temperature, seed=pi)
                for k, ratio, (name, policy, acc) in itertools.product(args.draft_len, args.ratio, policies):
                    accepted, mass = evaluate(model, traj, k, ratio, args.min_budget, policy, temperature, acc)
                    rows.append(dict(context=context, temperature=temperature, prompt=pi, draft_len=k, budget_ratio=ratio,
                                     min_budget=args.min_budget, policy=name, accepted=accepted, mass=mass))
                print(f"[{time.time() - started:6.0f}s] context {context} T={temperature} prompt {pi} done", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    summarize(rows)


def summarize(rows) -> None:
    keys = sorted({(r["context"], r["temperature"], r["draft_len"], r["budget_ratio"]) for r in rows})
    names = list(dict.fromkeys(r["policy"] for r in rows))
    for key in keys:
        print(f"\ncontext {key[0]} T={key[1]} k={key[2]} ratio={key[3]}")
        for name in names:
            sub = [r for r in rows if (r["context"], r["temperature"], r["draft_len"], r["budget_ratio"]) == key and r["policy"] == name]
            if not sub:
                continue
            acc = sum(r["accepted"] for r in sub) / len(sub)
            mass = [sum(r["mass"][layer] for r in sub) / len(sub) for layer in range(len(sub[0]["mass"]))]
            print(f"  {name:34s} accepted {acc:5.2f}  mass {sum(mass) / len(mass):.3f}  min-layer {min(mass):.3f}  "
                  + " ".join(f"{m:.2f}" for m in mass))


def knobs(pool, recent, sinks):
    return dict(pool=pool, recent_fraction=recent, sinks=sinks)


GRIDS = {
    "main": [
        ("paper", "paper", 0.0),
        ("window", "window", 0.0),
        *[(f"pool{p}", knobs(p, 0.0, 0), 0.0) for p in (3, 7, 15, 31)],
        *[(f"recent{f}", knobs(1, f, 0), 0.0) for f in (0.25, 0.5)],
        *[(f"pool{p}+recent{f}", knobs(p, f, 0), 0.0) for p in (7, 15, 31) for f in (0.25, 0.5, 0.75)],
        *[(f"pool{p}+recent{f}+sink4", knobs(p, f, 4), 0.0) for p in (7, 15) for f in (0.25, 0.5)],
        ("paper+acc0.8", "paper", 0.8),
        ("pool15+recent0.25+acc0.8", knobs(15, 0.25, 0), 0.8),
        ("pool15+recent0.5+acc0.8", knobs(15, 0.5, 0), 0.8),
    ],
}


if __name__ == "__main__":
    main()
