"""Fused sibling projections and the gated-MLP kernel (``generation/fused_linear``) on the CPU.

As in test_triton_kernels: ``TRITON_INTERPRET=1`` only takes effect if it is set before the kernels
are decorated, and other test modules may import Triton first, so the checks run in a child process
(this file run as a script) that reports back as JSON; the tests here read that report. Building
``FusedLinears`` runs the kernel (each MLP class is verified with it), so the model checks run there
too. A second child compiles the kernel for sm_90 without a GPU, since the interpreter accepts code
the compiler rejects.
"""

from __future__ import annotations

import sys

import pytest

from conftest import run_children


# name: (shape of gate|up, dtype, strided): odd widths exercise the masks, 1100 takes two column
# blocks, a strided input is a slice of wider rows.
SILU_CASES = {
    "silu_mul fp32 37 wide": ((5, 74), "float32", False),
    "silu_mul bf16 3d two blocks strided": ((2, 3, 2200), "bfloat16", True),
    "silu_mul fp16 64 wide": ((7, 128), "float16", False),
}
MODELS_CASE = "tiny models swapped"
RESTORED_CASE = "forwards restored"
REPLACED_CASE = "replaced weights"
SIBLING_CASE = "sibling inputs"
VARIANTS_CASE = "mlp variants"
SM90_CASE = "silu_mul compiles for sm_90"


# ---- the child process ---------------------------------------------------------------------------
def _check_silu_mul(case):
    import torch

    from hf_sparsespec.generation.fused_linear import silu_mul, silu_mul_reference

    shape, dtype_name, strided = SILU_CASES[case]
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(5)
    wide = torch.randn(*shape[:-1], shape[-1] + (6 if strided else 0)) * 4
    wide.view(-1)[:3] = -90.0  # exp overflows: silu is -0, not NaN
    gate_up = wide.to(dtype)[..., : shape[-1]]
    got, expected = silu_mul(gate_up), silu_mul_reference(gate_up)
    report = {"dtype_ok": got.dtype == dtype, "shape_ok": got.shape == expected.shape, "finite": bool(got.isfinite().all())}
    if dtype == torch.float32:  # one rounding each way; the exps differ in the last bit
        report["err"] = ((got - expected).abs() / expected.abs().clamp(min=1)).max().item()
        return report

    # silu rounded to the dtype, then the product rounded, as PyTorch's two kernels do. Triton 3.9's
    # interpreter truncates float32 to bfloat16 where the GPU rounds to nearest; either rounding is
    # accepted, but a single rounding of silu(gate) * up is not.
    def truncated(t):
        return (t.view(torch.int32) & -65536).view(torch.float32)

    def nearest(t):
        return t.to(dtype).float()

    gate, up = gate_up.float().chunk(2, dim=-1)
    silu = gate / (1 + torch.exp(-gate))
    roundings = (nearest, truncated) if dtype == torch.bfloat16 else (nearest,)
    report["mismatch_double"] = min(int((got.float() != r(r(silu) * up)).sum()) for r in roundings)
    report["mismatch_single"] = min(int((got.float() != r(silu * up)).sum()) for r in roundings)
    report["elements"] = got.numel()
    return report


class _LinearCalls:
    """Counts ``F.linear`` calls (one per GEMM) while active."""

    def __init__(self):
        import torch.nn.functional as F
        from torch.overrides import TorchFunctionMode

        counter = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                counter.count += func is F.linear
                return func(*args, **(kwargs or {}))

        self.count, self.mode = 0, Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def _kernel_calls():
    """Replace the module's kernel entry point by a counting wrapper; returns the list of calls."""
    from hf_sparsespec.generation import fused_linear

    calls, kernel = [], fused_linear.silu_mul
    fused_linear.silu_mul = lambda *args: calls.append(1) or kernel(*args)
    return calls


def _storage_bytes(model):
    return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}.values())


IDS = [[3, 1, 4, 1, 5, 9, 2, 6]]


def _check_models(_case):
    import torch

    from hf_sparsespec.generation.fused_linear import FusedLinears

    from conftest import tiny_model

    calls = _kernel_calls()
    ids = torch.tensor(IDS)
    report = {}
    # Llama with biases on every projection (zero at init: made random so a dropped bias shows).
    for arch, overrides in (("qwen3", {}), ("llama", dict(attention_bias=True, mlp_bias=True))):
        model = tiny_model(arch, **overrides)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.Linear) and module.bias is not None:
                    module.bias.normal_()
            state = {k: v.clone() for k, v in model.state_dict().items()}
            bytes_before = _storage_bytes(model)
            expected = model(ids).logits
            with _LinearCalls() as plain:
                model(ids)
            fused = FusedLinears(model)
            calls.clear()
            with fused.swapped(), _LinearCalls() as swapped:
                got = model(ids).logits
            kernel_calls = len(calls)
            after = model(ids).logits
            again = FusedLinears(model)  # as a later engine for the same model builds it
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        state_after = model.state_dict()
        report[arch] = {
            "groups": len(fused.groups), "mlps": len(fused.mlps),
            "gemms_plain": plain.count, "gemms_swapped": swapped.count, "kernel_calls": kernel_calls,
            "err": (got - expected).abs().max().item(), "after_identical": torch.equal(after, expected),
            "state_identical": state.keys() == state_after.keys() and all(torch.equal(state[k], state_after[k]) for k in state),
            "bytes_same": bytes_before == _storage_bytes(model),
            "rebuilt_without_copy": [g.weight.data_ptr() for g in again.groups] == [g.weight.data_ptr() for g in fused.groups],
            "qkv_one_storage": attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr(),
            "gate_up_one_storage": mlp.gate_proj.bias.untyped_storage().data_ptr() == mlp.up_proj.bias.untyped_storage().data_ptr()
            if arch == "llama" else True,
            "forwards_restored": not any("forward" in m.__dict__ for m in model.modules()),
        }
    return report


def _check_restored(_case):
    import torch

    from hf_sparsespec.generation.fused_linear import FusedLinears

    from conftest import tiny_model

    model = tiny_model("qwen3")
    ids = torch.tensor(IDS)
    wrapped = []
    mlp, attn = model.model.layers[0].mlp, model.model.layers[1].self_attn
    mlp_forward, q_forward = mlp.forward, attn.q_proj.forward
    mlp.forward = lambda x: wrapped.append("mlp") or mlp_forward(x)  # installed by someone else
    attn.q_proj.forward = lambda x: wrapped.append("q") or q_forward(x)  # e.g. an adapter's patch
    mine_mlp, mine_q = mlp.forward, attn.q_proj.forward
    with torch.no_grad():
        expected = model(ids).logits
        fused = FusedLinears(model)
        wrapped.clear()
        with fused.swapped():
            got = model(ids).logits
            mlp_replaced = mlp.__dict__.get("forward") is not mine_mlp
            k_untouched = "forward" not in attn.k_proj.__dict__  # its group is left unfused
        inside = list(wrapped)
        with torch.enable_grad(), fused.swapped():  # the fused paths have no backward: nothing swapped
            grad_untouched = mlp.__dict__.get("forward") is mine_mlp and "forward" not in model.model.layers[0].self_attn.k_proj.__dict__
    return {
        "err": (got - expected).abs().max().item(),
        "mlp_replaced": mlp_replaced, "q_kept": inside == ["q"], "k_untouched": k_untouched,
        "restored": mlp.__dict__.get("forward") is mine_mlp and attn.q_proj.__dict__.get("forward") is mine_q
        and not any("forward" in m.__dict__ for m in model.modules() if m not in (mlp, attn.q_proj)),
        "grad_untouched": grad_untouched,
    }


def _check_replaced(_case):
    import torch
    from torch import nn

    from hf_sparsespec.generation.fused_linear import FusedLinears

    from conftest import tiny_model

    class ShiftedLinear(nn.Linear):  # a subclass (as quantized linears are): never fused
        def forward(self, x):
            return super().forward(x) + 1.0

    model = tiny_model("qwen3")
    ids = torch.tensor(IDS)
    attn0, attn1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    with torch.no_grad():
        fused = FusedLinears(model)
        before = model(ids).logits
        attn0.q_proj.weight = nn.Parameter(torch.randn_like(attn0.q_proj.weight) * 0.1)  # a new Parameter
        attn1.k_proj.weight.data = attn1.k_proj.weight * 2  # the same Parameter on new data
        shifted = ShiftedLinear(64, attn1.v_proj.out_features, bias=False)
        shifted.weight.copy_(attn1.v_proj.weight)
        attn1.v_proj = shifted  # a new module
        expected = model(ids).logits
        with fused.swapped():
            got = model(ids).logits
    q, k = attn0.q_proj.weight, attn0.k_proj.weight
    return {
        "changed": not torch.allclose(expected, before), "err": (got - expected).abs().max().item(),
        "rebuilt": q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr(),
        "given_up": len(fused.groups) == 3 and "forward" not in shifted.__dict__,
        # the given-up group's remaining member holds its own rows only, not the whole concatenation
        "released": attn1.q_proj.weight.untyped_storage().nbytes() == attn1.q_proj.weight.numel() * 4,
    }


def _check_siblings(_case):
    import gc
    import weakref

    import torch
    import torch.nn.functional as F

    from hf_sparsespec.generation.fused_linear import FusedLinears

    from conftest import tiny_model

    model = tiny_model("qwen3")
    attn = model.model.layers[0].self_attn
    torch.manual_seed(6)
    x, y, z = torch.randn(1, 5, 64), torch.randn(1, 5, 64), torch.randn(1, 5, 64)
    wq, wk, wv = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
    with torch.no_grad():
        fused = FusedLinears(model)
        with fused.swapped():
            q = attn.q_proj(x)
            k_of_y = attn.k_proj(y)  # another tensor: the sibling's own weights
            k = attn.k_proj(x)  # the same tensor: its slice of the fused GEMM
            x_before = x.clone()
            x.mul_(2.0)  # changed in place after the GEMM: the stashed slice is stale
            v = attn.v_proj(x)
            attn.q_proj(z)  # leaves slices stashed for k and v of z
        ref = weakref.ref(z)
        del z
        gc.collect()
    return {
        "q": torch.equal(q, F.linear(x_before, wq)), "k_of_y": torch.equal(k_of_y, F.linear(y, wk)),
        "k": torch.equal(k, F.linear(x_before, wk)), "v_after_in_place": torch.equal(v, F.linear(x, wv)),
        "stash_released": ref() is None,
    }


def _check_variants(_case):
    import torch
    import torch.nn.functional as F
    from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

    from hf_sparsespec.generation.fused_linear import FusedLinears

    from conftest import tiny_model

    class GeluMLP(Qwen3MLP):  # SiLU act_fn attribute, but the forward computes GELU
        def forward(self, x):
            return self.down_proj(F.gelu(self.gate_proj(x)) * self.up_proj(x))

    class UpGatedMLP(Qwen3MLP):  # the activation on the other projection
        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    calls = _kernel_calls()
    model = tiny_model("qwen3")
    layers = model.model.layers
    layers[0].mlp.__class__ = GeluMLP
    model.extra_mlp = UpGatedMLP(model.config)  # not called: only checked
    ids = torch.tensor(IDS)
    attention = []
    layers[0].self_attn.register_forward_hook(lambda module, args, out: attention.append(out[0]))
    with torch.no_grad():
        expected = model(ids).logits
        fused = FusedLinears(model)
        calls.clear()
        with fused.swapped(), _LinearCalls() as gemms:
            got = model(ids).logits
            kept = ["forward" not in layer.mlp.__dict__ for layer in layers]
    return {
        "swapped_mlps": [i for i, layer in enumerate(layers) if any(layer.mlp is mlp for mlp, _ in fused.mlps)],
        "up_gated_kept": all(mlp is not model.extra_mlp for mlp, _ in fused.mlps) and "forward" not in model.extra_mlp.__dict__,
        "kept": kept, "kernel_calls": len(calls), "gemms": gemms.count,
        "err": (got - expected).abs().max().item(),
        "attention_identical": torch.equal(attention[0], attention[1]),
    }


def _check_sm90(_case):
    from test_triton_kernels import compile_sm90

    compile_sm90("_silu_mul_kernel", {"BLOCK": 1024}, 4)
    return {"compiled": True}


def _child(names: list[str]) -> None:
    from conftest import run_checks

    run_checks({
        **{name: _check_silu_mul for name in SILU_CASES}, MODELS_CASE: _check_models, RESTORED_CASE: _check_restored,
        REPLACED_CASE: _check_replaced, SIBLING_CASE: _check_siblings, VARIANTS_CASE: _check_variants, SM90_CASE: _check_sm90,
    }, names)


# ---- the tests -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def results():
    pytest.importorskip("triton")
    interpreted = [*SILU_CASES, MODELS_CASE, RESTORED_CASE, REPLACED_CASE, SIBLING_CASE, VARIANTS_CASE]
    return run_children(__file__, [(interpreted, True), ([SM90_CASE], False)])


def _ok(results, case):
    r = results[case]
    assert "error" not in r, r.get("error")
    return r


@pytest.mark.parametrize("case", list(SILU_CASES))
def test_silu_mul_matches_pytorch(results, case):
    r = _ok(results, case)
    assert r["dtype_ok"] and r["shape_ok"] and r["finite"], r
    if "err" in r:
        assert r["err"] <= 1e-6, r
    else:
        # A rare last-bit difference of exp may move a rounding; rounding once moves about a quarter.
        assert r["mismatch_double"] <= r["elements"] // 500, r
        assert r["mismatch_single"] > r["elements"] // 10, "the check cannot tell the roundings apart"


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_swapped_model_computes_the_same_logits(results, arch):
    r = _ok(results, MODELS_CASE)[arch]
    assert r["groups"] == 4 and r["mlps"] == 2, r  # (q, k, v) and (gate, up) of 2 layers
    # Per layer q, k, v, o, gate, up, down become qkv, o, gate|up, down; plus the LM head.
    assert (r["gemms_plain"], r["gemms_swapped"]) == (15, 9), r
    assert r["kernel_calls"] == 2, r
    assert r["err"] <= 1e-5 and r["after_identical"], r  # the kernel's exp differs from torch's in the last bit


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_fusing_keeps_parameters_state_dict_and_memory(results, arch):
    r = _ok(results, MODELS_CASE)[arch]
    assert r["state_identical"], "the parameters must keep their values and names"
    assert r["bytes_same"], "the concatenated weights must replace the separate ones, not add to them"
    assert r["qkv_one_storage"] and r["gate_up_one_storage"], r
    assert r["rebuilt_without_copy"], "weights already back to back are used where they lie"
    assert r["forwards_restored"], r


def test_forwards_installed_by_others_come_back(results):
    r = _ok(results, RESTORED_CASE)
    assert r["mlp_replaced"], "a verified MLP runs the fused path during the step"
    assert r["q_kept"] and r["k_untouched"], "a projection with its own forward keeps it, and its group stays unfused"
    assert r["restored"], r
    assert r["grad_untouched"], "with gradients on, nothing is swapped"
    assert r["err"] <= 1e-5, r


def test_replaced_parameters_and_modules_are_never_computed_stale(results):
    r = _ok(results, REPLACED_CASE)
    assert r["changed"], "the replacement must change the logits for the check to mean anything"
    assert r["err"] <= 1e-5, r
    assert r["rebuilt"], "a group with a replaced parameter is fused again from the new one"
    assert r["given_up"], "a group with a member of another type is left to its own code"
    assert r["released"], r


def test_siblings_take_the_fused_slice_only_for_the_same_unmodified_input(results):
    r = _ok(results, SIBLING_CASE)
    assert r["q"] and r["k"], r
    assert r["k_of_y"], "a sibling given another tensor must compute with its own weights"
    assert r["v_after_in_place"], "an input modified in place must not get the slice computed before"
    assert r["stash_released"], "no input may be kept alive after the step"


def test_mlps_computing_something_else_keep_their_forward(results):
    r = _ok(results, VARIANTS_CASE)
    assert r["swapped_mlps"] == [1] and r["up_gated_kept"], r
    assert r["kept"] == [True, False], r
    assert r["kernel_calls"] == 1, r
    assert r["gemms"] == 2 * 4 + 1, r  # gate|up still one GEMM in the kept MLP
    assert r["err"] <= 1e-5, r
    # Only in the attention: CPU elementwise kernels (GELU's erf) round differently on strided slices.
    assert r["attention_identical"], "fused projections compute the same dot products"


def test_silu_mul_compiles_for_sm90(results):
    assert _ok(results, SM90_CASE)["compiled"]


if __name__ == "__main__":
    _child(sys.argv[1:])
