"""The GPU fast path at the bench model's longest context (16k), run on the accelerator machine.

    PYTHONPATH=. python3 benchmarks/long_context_check.py --out $OUT

Each case runs in its own process, so a device-side assert in one (the first 128 x 16k throughput
run hit "probability tensor contains inf/nan") cannot hide the others, and the cases that vary one
setting at a time say which path is at fault:

- fp32 greedy at 16k, batch 4: token-identical to transformers' greedy ``generate``;
- bf16 sampling at batch 128 and 16k: default settings; prompts prefilled in 4096-token chunks
  (continuation chunks go through the Triton prefill tiles); CUDA graphs off; reference attention;
- bf16 sampling at batch 128 and 8k with ``check_finite``: graphs on, off, and without delayed
  verification.

Run a subset with ``--cases NAME ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 16384

CASES = {
    "fp32_greedy_b4": dict(batch=4, new=64, dtype="float32", sample=False, compare=True, engine={}),
    # The batch-128 failure also happens at 8k (session 2); check_finite names the first
    # non-finite layer and the step's rows without adding host synchronisation.
    "bf16_b128_8k_check": dict(context=8192, batch=128, new=512, dtype="bfloat16", sample=True,
                               engine=dict(prefill_chunk=65536, check_finite=True)),
    "bf16_b128_8k_check_no_graphs": dict(context=8192, batch=128, new=128, dtype="bfloat16", sample=True,
                                         engine=dict(prefill_chunk=65536, check_finite=True, use_cuda_graphs=False)),
    "bf16_b128_8k_check_no_delay": dict(context=8192, batch=128, new=512, dtype="bfloat16", sample=True,
                                        engine=dict(prefill_chunk=65536, check_finite=True, delayed_verification=False)),
    "bf16_b128_default": dict(batch=128, new=128, dtype="bfloat16", sample=True, engine=dict(prefill_chunk=65536)),
    "bf16_b128_chunked_prefill": dict(batch=128, new=128, dtype="bfloat16", sample=True, engine=dict(prefill_chunk=4096)),
    "bf16_b128_no_graphs": dict(batch=128, new=128, dtype="bfloat16", sample=True,
                                engine=dict(prefill_chunk=65536, use_cuda_graphs=False)),
    "bf16_b16_reference": dict(batch=16, new=64, dtype="bfloat16", sample=True,
                               engine=dict(prefill_chunk=65536, use_triton=False, use_cuda_graphs=False)),
}


def run_case(name: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_sparsespec
    from benchmarks.prompts import held_out_prompts

    case = CASES[name]
    model_dir = ROOT / "hf_sparsespec" / "models" / "bench-code-lm"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, case["dtype"])).cuda().eval()
    ids = torch.stack(held_out_prompts(tok, case.get("context", CONTEXT) - case["new"], case["batch"])).cuda()
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=case["new"],
                  min_new_tokens=case["new"], eos_token_id=None, pad_token_id=0)
    kwargs.update(dict(do_sample=True, temperature=0.6) if case["sample"] else dict(do_sample=False))
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(**kwargs, custom_generate=hf_sparsespec.generate, return_dict_in_generate=True, **case["engine"])
    torch.cuda.synchronize()
    result = {"seconds": round(time.perf_counter() - start, 2), "stats": out.spec_stats,
              "complete": out.sequences.shape[1] == ids.shape[1] + case["new"]}
    if case.get("compare"):
        ref = model.generate(**kwargs)
        result["identical_to_transformers"] = bool(torch.equal(ref, out.sequences))
        result["rows_identical"] = [bool(torch.equal(a, b)) for a, b in zip(ref, out.sequences)]
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("long_context_out"))
    p.add_argument("--case", help=argparse.SUPPRESS)  # the child process
    p.add_argument("--timeout", type=int, default=150)
    p.add_argument("--cases", nargs="+", default=list(CASES))
    args = p.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(args.case)), flush=True)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    report = {}
    for name in args.cases:
        try:
            proc = subprocess.run([sys.executable, __file__, "--case", name], capture_output=True, text=True,
                                  timeout=args.timeout, cwd=ROOT)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if lines:
                report[name] = json.loads(lines[-1][len("RESULT "):])
            else:
                (args.out / f"long_context_{name}.stderr").write_text(proc.stderr)
                errors = [ln for ln in proc.stderr.splitlines() if "rror" in ln or "ssert" in ln]
                report[name] = {"error": list(dict.fromkeys(errors))[:12]}
        except subprocess.TimeoutExpired:
            report[name] = {"error": f"timed out after {args.timeout} s"}
        print(name, json.dumps(report[name])[:600], flush=True)
        (args.out / "long_context_check.json").write_text(json.dumps(report, indent=1, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v)))


if __name__ == "__main__":
    main()
