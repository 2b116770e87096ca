"""End-to-end checks of the GPU fast path (Triton kernels + CUDA graphs), run on the accelerator machine.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out $OUT

1. Greedy float32 on CUDA: token-identical to transformers' greedy ``generate``, also in lockstep
   rounds; also for a random model with 128-dim heads in lockstep rounds, whose
   verification-only steps take whole-row tiles.
2. bf16 sampling runs end to end; greedy bf16 output is compared for its common prefix (bf16
   kernels with another summation order may flip near-ties, so a difference is reported, not failed).
3. Host synchronisations inside the steady state, counted with ``torch.cuda.set_sync_debug_mode``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_sparsespec

ROOT = Path(__file__).resolve().parents[1]
BENCH_MODEL = ROOT / "hf_sparsespec" / "models" / "bench-code-lm"


def prompts(tok, count: int, length: int) -> dict:
    text = "\n\n".join(p.read_text() for p in sorted((ROOT / "hf_sparsespec").rglob("*.py")))
    ids = tok(text).input_ids
    step = (len(ids) - length) // count
    rows = [ids[i * step : i * step + length - 97 * i] for i in range(count)]  # mixed lengths
    tok.padding_side = "left"
    return tok.pad({"input_ids": rows}, return_tensors="pt")


def wide_heads_check(report: dict, enc: dict, vocab: int) -> None:
    """fp32 greedy identity of a random Qwen3 with 128-dim heads (group 4) in lockstep rounds, and
    how many of its steps were verification-only (whole-row query tiles, ``_tile_shape``)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from hf_sparsespec.generation import engine as engine_module

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=vocab, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=128, max_position_embeddings=4096)
    model = Qwen3ForCausalLM(config).cuda().eval()
    flags = []
    original = engine_module.build_step

    def build_step(*args, **kwargs):
        step = original(*args, **kwargs)
        flags.append(step.verification_only)
        return step

    engine_module.build_step = build_step
    try:
        ref = model.generate(**enc, max_new_tokens=100, do_sample=False)
        out = model.generate(**enc, max_new_tokens=100, do_sample=False, custom_generate=hf_sparsespec.generate,
                             return_dict_in_generate=True, unified_schedule=False, plain_tail=0.0, min_budget=16)
    finally:
        engine_module.build_step = original
    report["wide_heads_lockstep_fp32_identical"] = bool(torch.equal(ref, out.sequences))
    report["wide_heads_verification_only_steps"] = sum(flags)
    print("128-dim heads, lockstep, fp32 greedy identical:", report["wide_heads_lockstep_fp32_identical"],
          f"({sum(flags)} of {len(flags)} steps verification-only)", flush=True)


def fused_modules_check(report: dict, model, ids: torch.Tensor) -> None:
    """bf16 logits of the bench model's own forward, and under the engine's fused modules (norms, rotary,
    residual adds, projections), with the q/k norms and residual adds folded (the default) and without
    (as before session 12): how far each is from the model's own forward, and how often its argmax differs."""
    from contextlib import ExitStack

    from hf_sparsespec.generation.fused_linear import FusedLinears
    from hf_sparsespec.generation.fused_norm import FusedNorms
    from hf_sparsespec.generation.fused_residual import FusedResiduals
    from hf_sparsespec.generation.fused_rotary import FusedRotary

    with torch.no_grad():
        expected = model(ids).logits.float()
        for folded in (True, False):
            norms = FusedNorms(model)
            rotary = FusedRotary(model, norms)
            if not folded:
                rotary.head_norms = []
            fused = [norms, rotary, *([FusedResiduals(model, norms)] if folded else []), FusedLinears(model)]
            with ExitStack() as stack:
                for f in fused:
                    stack.enter_context(f.swapped())
                got = model(ids).logits.float()
            name = "bf16_fused_modules" + ("" if folded else "_unfolded")
            report[name] = {
                "norms": len(norms.modules), "head_norms": len(rotary.head_norms),
                "residual_layers": len(fused[2].layers) if folded else 0,
                "max_abs_diff": (got - expected).abs().max().item(), "logit_scale": expected.abs().max().item(),
                "argmax_differs": float((got.argmax(-1) != expected.argmax(-1)).float().mean()),
            }
            print(f"bf16 logits, fused modules ({'folded' if folded else 'unfolded'}) against the model's own forward:",
                  report[name], flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    p.add_argument("--selection", default="pillar", help="the selection policy of every sparsespec call")
    p.add_argument("--fp32-only", action="store_true", help="stop after the float32 greedy comparison")
    p.add_argument("--wide-only", action="store_true", help="only the 128-dim-head model's float32 greedy comparison")
    p.add_argument("--fused-only", action="store_true", help="only the bf16 logits under the fused modules")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    tok = AutoTokenizer.from_pretrained(BENCH_MODEL)
    enc = {k: v.cuda() for k, v in prompts(tok, 6, 1500).items()}
    if args.wide_only:
        wide_heads_check(report, enc, len(tok))
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
        return

    bf16 = AutoModelForCausalLM.from_pretrained(BENCH_MODEL, dtype=torch.bfloat16).cuda().eval()
    fused_modules_check(report, bf16, enc["input_ids"][:1, -512:])  # one sequence, as the engine calls it
    del bf16
    if args.fused_only:
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
        return
    model = AutoModelForCausalLM.from_pretrained(BENCH_MODEL, dtype=torch.float32).cuda().eval()
    ref = model.generate(**enc, max_new_tokens=300, do_sample=False)
    out = model.generate(**enc, max_new_tokens=300, do_sample=False, custom_generate=hf_sparsespec.generate,
                         return_dict_in_generate=True, selection=args.selection)
    report["selection"] = args.selection
    report["fp32_greedy_identical"] = bool(torch.equal(ref, out.sequences))
    report["fp32_rows_identical"] = [bool(torch.equal(a, b)) for a, b in zip(ref, out.sequences)]
    report["fp32_stats"] = out.spec_stats
    print("fp32 greedy identical:", report["fp32_greedy_identical"], out.spec_stats, flush=True)
    out = model.generate(**enc, max_new_tokens=300, do_sample=False, custom_generate=hf_sparsespec.generate,
                         return_dict_in_generate=True, selection=args.selection, unified_schedule=False)
    report["fp32_lockstep_identical"] = bool(torch.equal(ref, out.sequences))
    print("fp32 greedy identical in lockstep rounds:", report["fp32_lockstep_identical"],
          out.spec_stats, flush=True)
    wide_heads_check(report, enc, len(tok))
    if args.fp32_only:
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
        return

    model = model.to(torch.bfloat16)
    ref = model.generate(**enc, max_new_tokens=300, do_sample=False)
    out = model.generate(**enc, max_new_tokens=300, do_sample=False, custom_generate=hf_sparsespec.generate,
                         return_dict_in_generate=True, selection=args.selection)
    width = enc["input_ids"].shape[1]
    prefix = []
    for a, b in zip(ref[:, width:], out.sequences[:, width:]):
        diff = (a != b).nonzero()
        prefix.append(int(diff[0]) if diff.numel() else int(a.numel()))
    report["bf16_greedy_common_prefix"] = prefix
    print("bf16 greedy common prefix per row:", prefix, flush=True)

    # Steady-state syncs: a warm second call, every synchronising CUDA call reported as a warning.
    sampling = dict(do_sample=True, temperature=0.6, max_new_tokens=200, custom_generate=hf_sparsespec.generate,
                    return_dict_in_generate=True, selection=args.selection)
    model.generate(**enc, **sampling)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = model.generate(**enc, **sampling)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()]
    report["bf16_sample_stats"] = out.spec_stats
    report["sync_warnings"] = len(syncs)
    report["sync_warning_kinds"] = sorted(set(syncs))[:20]
    report["forward_passes"] = out.spec_stats["num_forward_passes"]
    print("sampling stats:", out.spec_stats, flush=True)
    print(f"sync warnings in a warm call: {len(syncs)} over {out.spec_stats['num_forward_passes']} iterations", flush=True)
    for kind in report["sync_warning_kinds"]:
        print("  ", kind)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
