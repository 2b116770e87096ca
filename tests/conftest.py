"""Shared fixtures: tiny random models of several architectures and the bundled trained model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import hf_sparsespec  # noqa: F401  (registers the attention function and the custom_generate name)

BENCH_MODEL = Path(hf_sparsespec.__file__).parent / "models" / "bench-code-lm"
PACKAGE_DIR = Path(hf_sparsespec.__file__).parent
REPO = Path(__file__).resolve().parents[1]

TINY_CONFIGS = {
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral", sliding_window=None),
    "qwen2": dict(model_type="qwen2", use_sliding_window=False),
    "qwen3": dict(model_type="qwen3", use_sliding_window=False, head_dim=16),
}


def tiny_model(arch: str, seed: int = 0, vocab_size: int = 256, dtype: torch.dtype = torch.float32, **overrides):
    """A 2-layer GQA model with random weights; fixed seed so failures reproduce."""
    spec = dict(TINY_CONFIGS[arch])
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **{**spec, **overrides},
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    # Random init gives near-uniform logits; sharper ones make greedy ties (and flaky comparisons) rare.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


@pytest.fixture(scope="session")
def bench_model():
    return AutoModelForCausalLM.from_pretrained(BENCH_MODEL, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def bench_tokenizer():
    tok = AutoTokenizer.from_pretrained(BENCH_MODEL)
    tok.padding_side = "left"
    return tok


def code_prompts(tokenizer, num_tokens: int, count: int) -> list[str]:
    """Held-out code: this project's own sources (written after the bench model was trained)."""
    sources = sorted(PACKAGE_DIR.rglob("*.py"))
    text = "\n\n".join(p.read_text() for p in sources)
    ids = tokenizer(text).input_ids
    step = max(1, (len(ids) - num_tokens) // max(count, 1))
    return [tokenizer.decode(ids[i * step : i * step + num_tokens]) for i in range(count)]


@pytest.fixture
def sparsespec_runs(monkeypatch):
    """Records every SparseSpec run in a test, proving that a call reached the strategy and not plain decoding."""
    from hf_sparsespec.generation import strategy

    runs = []
    original = strategy.run_sparsespec

    def recording_run(model, input_ids, *args, **kwargs):
        runs.append(input_ids.shape)
        return original(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(strategy, "run_sparsespec", recording_run)
    return runs


@pytest.fixture(scope="module")
def one_thread():
    """Run torch single-threaded: on a small shared CPU, tiny ops spend far longer handing work between
    threads (and waiting for descheduled ones) than computing. Module-scoped so that it also covers
    the module's own module-scoped fixtures (reference generations)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---- kernel checks in child processes --------------------------------------------------------
# TRITON_INTERPRET must be set before triton is imported, so kernel tests run their cases in child
# processes: the test module itself, run as a script with the case names as arguments.
def run_checks(checks: dict, names: list[str]) -> None:
    """The child's side: run the named checks and print their results as one JSON line."""
    import torch

    torch.use_deterministic_algorithms(True)  # with fill_uninitialized_memory: torch.empty holds NaN
    results = {}
    for name in names:
        try:
            results[name] = checks[name](name)
        except Exception as exc:  # reported per case by the parent
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    print("RESULTS " + json.dumps(results))


def run_children(script: str, groups: list[tuple[list[str], bool]]) -> dict:
    """The parent's side: one child of ``script`` per (case names, interpreted) group, all at once."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    procs = [
        subprocess.Popen([sys.executable, script, *names], cwd=REPO, env={**env, "TRITON_INTERPRET": "1"} if interpreted else env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for names, interpreted in groups
    ]
    results = {}
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        lines = [line for line in stdout.splitlines() if line.startswith("RESULTS ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"kernel-check child failed (exit {proc.returncode}):\n{stderr[-4000:]}")
        results.update(json.loads(lines[-1][len("RESULTS ") :]))
    return results
