"""What SparseSpec cannot do fails loudly, with a message that names the fix."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_sparsespec

from conftest import tiny_model

STRATEGIES = pytest.mark.parametrize("strategy", ["sparsespec", hf_sparsespec.generate], ids=["name", "callable"])
IDS = torch.tensor([[1, 5, 6, 7, 8]])


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen3")


def _from_config(model_type: str, **fields) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=64, eos_token_id=2, pad_token_id=0, **fields)
    return AutoModelForCausalLM.from_config(config).eval()


CALL_ERRORS = {
    "beam search": (dict(num_beams=2), r"beam search: use num_beams=1"),
    "beam sampling": (dict(num_beams=2, do_sample=True), r"beam search: use num_beams=1"),
    "contrastive search": (dict(penalty_alpha=0.6, top_k=4), r"contrastive search: unset .*`penalty_alpha`"),
    "prompt lookup": (dict(prompt_lookup_num_tokens=3), r"drop `prompt_lookup_num_tokens`"),
    "attentions": (dict(output_attentions=True, return_dict_in_generate=True), r"set output_attentions=False"),
    "hidden states": (dict(output_hidden_states=True, return_dict_in_generate=True), r"output_hidden_states=False"),
}


@STRATEGIES
@pytest.mark.parametrize("case", CALL_ERRORS, ids=list(CALL_ERRORS))
def test_unsupported_call(model, strategy, case):
    kwargs, message = CALL_ERRORS[case]
    with pytest.raises(ValueError, match=message):
        model.generate(IDS, max_new_tokens=8, custom_generate=strategy, **kwargs)


@STRATEGIES
def test_inputs_embeds(model, strategy):
    embeds = model.get_input_embeddings()(IDS)
    with pytest.raises(ValueError, match=r"\['inputs_embeds'\].*pass token ids"):
        model.generate(inputs_embeds=embeds, max_new_tokens=8, custom_generate=strategy)


@STRATEGIES
def test_assistant_model(model, strategy):
    with pytest.raises(ValueError, match="drop `assistant_model`"):
        model.generate(IDS, max_new_tokens=8, custom_generate=strategy, assistant_model=tiny_model("qwen3", seed=1))


MODEL_ERRORS = {
    # A real architecture whose attention is hand-written instead of going through AttentionInterface.
    "no attention backend": (
        lambda: _from_config("bloom", n_layer=2, n_head=4, hidden_size=32),
        r"BloomForCausalLM does not route attention through transformers' AttentionInterface.*Use plain `generate`",
    ),
    "sliding window": (
        lambda: tiny_model("mistral", sliding_window=6),
        r"sliding-window attention \(6 tokens\).*`model.config.sliding_window = None`",
    ),
    "sliding layers": (
        lambda: tiny_model(
            "qwen3", use_sliding_window=True, sliding_window=6, layer_types=["full_attention", "sliding_attention"]
        ),
        r"\['sliding_attention'\] layers; SparseSpec supports full-attention layers only.*plain `generate`",
    ),
    "linear attention": (
        lambda: _from_config(
            "qwen3_next",
            num_hidden_layers=2,
            hidden_size=64,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            layer_types=["linear_attention", "full_attention"],
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
        ),
        r"\['linear_attention'\] layers; SparseSpec supports full-attention layers only.*plain `generate`",
    ),
    "multi-head latent attention": (
        lambda: _from_config(
            "deepseek_v3",
            num_hidden_layers=2,
            hidden_size=64,
            intermediate_size=64,
            num_attention_heads=4,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
        ),
        r"DeepseekV3ForCausalLM uses multi-head latent attention \(MLA\).*plain `generate`",
    ),
}


@STRATEGIES
@pytest.mark.parametrize("case", MODEL_ERRORS, ids=list(MODEL_ERRORS))
def test_unsupported_model(strategy, case):
    build, message = MODEL_ERRORS[case]
    with pytest.raises(ValueError, match=message):
        build().generate(IDS, max_new_tokens=8, custom_generate=strategy)


def test_sliding_window_longer_than_the_call_is_fine():
    model = tiny_model("mistral", sliding_window=64)
    plain = model.generate(IDS, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(IDS, max_new_tokens=8, do_sample=False, custom_generate="sparsespec"), plain)
