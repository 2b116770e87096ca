"""The bare name ``custom_generate="sparsespec"``, the hook behind it, and the Hub-publishable folder."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import GenerationMixin

import hf_sparsespec
from hf_sparsespec.generation import registry

from conftest import tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]
HUB_DIR = Path(hf_sparsespec.__file__).parent / "hub"


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen3")


@pytest.fixture(scope="module")
def batch():
    """Two left-padded prompts of different lengths (pad id 0)."""
    ids = torch.tensor([[0, 0, 1, 5, 6, 7], [1, 9, 10, 11, 12, 13]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def test_name_matches_callable_and_plain_greedy(model, batch, sparsespec_runs):
    plain = model.generate(**batch, max_new_tokens=24, do_sample=False)
    by_name = model.generate(**batch, max_new_tokens=24, do_sample=False, custom_generate="sparsespec")
    by_callable = model.generate(**batch, max_new_tokens=24, do_sample=False, custom_generate=hf_sparsespec.generate)
    assert torch.equal(by_name, plain)
    assert torch.equal(by_callable, plain)
    assert len(sparsespec_runs) == 2


def test_name_passes_sparsespec_keywords_through(model, batch):
    off = model.generate(
        **batch, max_new_tokens=12, do_sample=False, custom_generate="sparsespec", speculate=False, return_dict_in_generate=True
    )
    on = model.generate(
        **batch, max_new_tokens=12, do_sample=False, custom_generate="sparsespec", draft_len=3, return_dict_in_generate=True
    )
    assert off.spec_stats["num_draft_steps"] == 0
    assert on.spec_stats["num_draft_steps"] > 0
    assert on.spec_stats["mean_accepted"] <= 3 + 1
    assert torch.equal(off.sequences, on.sequences)


def test_name_works_in_a_fresh_interpreter_elsewhere_and_offline(tmp_path):
    # A folder named like the strategy in the working directory must not shadow it.
    (tmp_path / "sparsespec").mkdir()
    script = textwrap.dedent(
        """
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        import hf_sparsespec

        config = AutoConfig.for_model("llama", vocab_size=128, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      eos_token_id=2, pad_token_id=0)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        ids = torch.tensor([[1, 5, 6, 7]])
        plain = model.generate(ids, max_new_tokens=10, do_sample=False)
        fast = model.generate(ids, max_new_tokens=10, do_sample=False, custom_generate="sparsespec",
                              return_dict_in_generate=True)
        assert torch.equal(plain, fast.sequences), (plain, fast.sequences)
        print("verify steps", fast.spec_stats["num_verify_steps"])
        """
    )
    python_path = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(python_path)}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "verify steps" in done.stdout


def test_install_is_idempotent():
    hook = GenerationMixin.load_custom_generate
    registry.install()
    importlib.reload(registry).install()
    importlib.reload(hf_sparsespec)
    assert GenerationMixin.load_custom_generate is hook
    # Exactly one layer of wrapping: under the hook sits transformers' own method.
    assert not hasattr(hook.__wrapped__, "__wrapped__")
    assert hook.__wrapped__.__module__ == "transformers.generation.utils"


def test_other_names_reach_transformers(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sparsespec").mkdir()
    ids = torch.tensor([[1, 5, 6, 7]])
    # Spelled as a path, the name is a local folder again: transformers looks inside and finds no recipe.
    for other in ("./sparsespec", str(tmp_path / "sparsespec")):
        with pytest.raises(OSError, match="does not contain a `custom_generate` subdirectory"):
            model.generate(ids, max_new_tokens=2, custom_generate=other)


def _installed() -> bool:
    try:
        importlib.metadata.version("hf-sparsespec")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _installed(), reason="the Hub folder's requirements.txt needs hf-sparsespec pip-installed (make test does)")
def test_hub_folder_loads_from_a_local_path(model, batch, sparsespec_runs):
    plain = model.generate(**batch, max_new_tokens=16, do_sample=False)
    hub = model.generate(**batch, max_new_tokens=16, do_sample=False, custom_generate=str(HUB_DIR), trust_remote_code=True)
    assert torch.equal(hub, plain)
    assert len(sparsespec_runs) == 1


def test_hub_folder_needs_trust_remote_code(model):
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=2, custom_generate=str(HUB_DIR))


def test_hub_folder_has_what_the_hub_expects():
    assert (HUB_DIR / "README.md").is_file()
    assert "hf-sparsespec" in (HUB_DIR / "custom_generate" / "requirements.txt").read_text()
    spec = importlib.util.spec_from_file_location("hub_generate", HUB_DIR / "custom_generate" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.generate)
