"""Quickstart: plain greedy ``generate`` next to SparseSpec on a few code prompts.

Offline on the CPU with the bundled bench-code-lm by default (about a minute on 2 cores):

    python examples/quickstart.py

Any local checkpoint or Hub id works the same way, for example on a GPU:

    python examples/quickstart.py --model Qwen/Qwen3-1.7B --device cuda --dtype bfloat16 --max-new-tokens 512

For each prompt it prints both continuations, each one's tokens/s, SparseSpec's mean accepted draft
length and whether the two greedy outputs are identical (they should always be).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_sparsespec  # noqa: F401  (makes custom_generate="sparsespec" resolve)

BUNDLED_MODEL = Path(hf_sparsespec.__file__).parent / "models" / "bench-code-lm"

# Each ends at a line's last token: a prompt ending in a newline splits the tokenizer's "newline +
# indent" tokens, and small models answer that with a new top-level definition.
PROMPTS = [
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):",
    "import os\n\n\ndef list_python_files(root):\n    result = []\n    for dirpath, dirnames, filenames in os.walk(root):",
    'import json\n\n\ndef load_settings(path):\n    """Read a JSON settings file."""\n    with open(path) as f:',
]

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(BUNDLED_MODEL), help="local path or Hub id (default: the bundled bench-code-lm)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on cpu, bfloat16 otherwise")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--draft-len", type=int, default=None, help="SparseSpec draft length k (default: SparseSpecConfig's)")
    return parser.parse_args()


def timed_generate(model, inputs, **kwargs):
    """``generate`` and its wall time; synchronised so asynchronous GPU work is counted."""
    if inputs.input_ids.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(**inputs, do_sample=False, **kwargs)
    if inputs.input_ids.device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    sparsespec = {"custom_generate": "sparsespec", "return_dict_in_generate": True}
    if args.draft_len is not None:
        sparsespec["draft_len"] = args.draft_len

    # One short call of each first, so one-time costs (allocator, kernel choice, the engine's KV pool)
    # stay out of the timings below.
    warm = tokenizer(PROMPTS[0], return_tensors="pt").to(device)
    timed_generate(model, warm, max_new_tokens=4)
    timed_generate(model, warm, max_new_tokens=4, **sparsespec)

    totals = {"plain_s": 0.0, "fast_s": 0.0, "plain_tokens": 0, "fast_tokens": 0, "accepted": 0.0, "verifies": 0}
    all_match = True
    for i, prompt in enumerate(PROMPTS, 1):
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        width = inputs.input_ids.shape[1]
        plain, plain_s = timed_generate(model, inputs, max_new_tokens=args.max_new_tokens)
        fast, fast_s = timed_generate(model, inputs, max_new_tokens=args.max_new_tokens, **sparsespec)
        plain_new, fast_new = plain[0, width:], fast.sequences[0, width:]
        stats = fast.spec_stats
        match = torch.equal(plain_new, fast_new)
        all_match &= match

        print(f"=== prompt {i}/{len(PROMPTS)} " + "=" * 50)
        print(prompt)
        print(f"--- plain generate: {len(plain_new) / plain_s:.1f} tokens/s")
        print(tokenizer.decode(plain_new, skip_special_tokens=True))
        print(f"--- SparseSpec: {len(fast_new) / fast_s:.1f} tokens/s, mean accepted {stats['mean_accepted']:.2f}")
        print(tokenizer.decode(fast_new, skip_special_tokens=True))
        print(f"--- greedy outputs identical: {match}\n")

        totals["plain_s"] += plain_s
        totals["fast_s"] += fast_s
        totals["plain_tokens"] += len(plain_new)
        totals["fast_tokens"] += len(fast_new)
        totals["accepted"] += stats["mean_accepted"] * stats["num_verify_steps"]
        totals["verifies"] += stats["num_verify_steps"]

    print("=== summary " + "=" * 56)
    print(f"model: {args.model} on {device} ({dtype})")
    print(f"plain generate: {totals['plain_tokens'] / totals['plain_s']:.1f} tokens/s")
    print(f"SparseSpec:     {totals['fast_tokens'] / totals['fast_s']:.1f} tokens/s")
    print(f"mean accepted draft tokens per verification: {totals['accepted'] / max(totals['verifies'], 1):.2f}")
    print(f"all greedy outputs identical: {all_match}")
    if not all_match:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
