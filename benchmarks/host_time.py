"""The host's own work per engine iteration, on the CPU: planning, step building, page-table sync,
reading results back (the device step itself excluded). On the H200 a batch-128 decode step of the
bench model is 1-3 ms of device time, so host work of the same order sets the pace.

    PYTHONPATH=. python3 benchmarks/host_time.py --batch 128

A tiny random Qwen3 keeps the CPU forward short; the host path does not depend on the model's size.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_sparsespec
from hf_sparsespec.generation import engine as engine_module

TIMED = [(engine_module, "build_step"), (engine_module.Scheduler, "plan"), (engine_module.SlotPageTable, "sync"),
         (engine_module.Engine, "_absorb"), (engine_module.Engine, "_launch"), (engine_module.Engine, "_device_step")]


def measure(model, ids: torch.Tensor, new_tokens: int, options: dict) -> dict:
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  eos_token_id=None, pad_token_id=0, do_sample=True, temperature=0.6, custom_generate=hf_sparsespec.generate,
                  return_dict_in_generate=True, **options)
    model.generate(**kwargs)  # warm-up
    spent: dict[str, float] = {}
    originals = [(owner, name, getattr(owner, name)) for owner, name in TIMED]
    for owner, name, fn in originals:
        def timed(*args, _fn=fn, _name=name, **kw):
            began = time.perf_counter()
            try:
                return _fn(*args, **kw)
            finally:
                spent[_name] = spent.get(_name, 0.0) + time.perf_counter() - began
        setattr(owner, name, timed)
    try:
        out = model.generate(**kwargs)
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
    passes = out.spec_stats["num_forward_passes"]
    per = {name: 1e3 * s / passes for name, s in spent.items()}
    # _launch holds build_step, sync and the device step; what is left of it is host work too.
    per["rest of _launch"] = per.pop("_launch") - per["build_step"] - per["sync"] - per.pop("_device_step")
    per["host total"] = sum(per.values())
    return {"options": options, "passes": passes, "ms_per_pass": per}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=4096)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(1, 500, (args.batch, 64))
    for options in (dict(speculate=False), dict(), dict(unified_schedule=False)):
        print(json.dumps(measure(model, ids, args.new_tokens, options)), flush=True)


if __name__ == "__main__":
    main()
