"""Sibling projections as one GEMM, and SiLU-gated MLPs as that GEMM plus one Triton kernel, while the
engine runs a step.

A decoder layer applies q_proj, k_proj and v_proj to one input, and gate_proj and up_proj to
another: five GEMMs, then ``act_fn(gate) * up`` as two elementwise kernels. In a captured decode step
of the bench model (8 layers, ~240 kernels) every launch costs ~1.5 us of gap on an H200 beyond its
work, and at decode sizes the GEMMs are launch-bound (~3.2 us each for a few microseconds of work).
One GEMM over the concatenated weights per group, and one kernel for ``silu(gate) * up``, remove
three GEMMs and one elementwise kernel per layer. Qwen3's per-head q/k norms give two launches of
that back: ``fused_norm.rms_norm`` copies the strided q and k slices into contiguous rows. On an H200
(bench model in bf16, batch 16, 1k context) a decode iteration went from 355 to 333 kernels and
from 937 to 874 us of kernel time; bf16 logits were bit-identical, fp32 greedy output unchanged.

The concatenated weight is not a copy: it is allocated once, the members' weights are copied in, and
each member's ``weight`` (and ``bias``) is re-pointed at its rows, so the model's memory and what it
computes outside a step are unchanged. Before every step each member is checked (cheaply, by
pointer, shape, dtype and device) to still hold those rows; a group whose parameters were replaced
or moved is rebuilt from the new ones, or left to its own code, never run on stale weights.

While swapped, the first member of a group computes the whole GEMM, returns its slice and keeps the
others' slices keyed by its input; a sibling given that very tensor (unmodified) returns its slice,
anything else runs the sibling's own ``F.linear``, so forwards written for separate projections need
no change. Gated MLPs whose own forward the fused path reproduces (checked once per class on random
input) run GEMM, kernel and ``down_proj`` instead. Everything is undone when the step's model call
returns.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn
from transformers.activations import ACT2FN

# Attribute names of Linears that one module applies to the same input.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# transformers' "silu" class differs between versions (nn.SiLU in some, its own SiLUActivation in others).
_SILU_TYPES = (nn.SiLU, type(ACT2FN["silu"]))


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, width, stride_x, stride_o, BLOCK: tl.constexpr):
    """One program per (row, block of columns): out = silu(x[:, :width]) * x[:, width:]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < width
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + width + cols, mask=ok, other=0.0).to(tl.float32)
    # PyTorch's formula with a correctly rounded division (Triton's default one is approximate). Its
    # two kernels round silu's output to the dtype before the product; rounding once would change
    # about a quarter of bfloat16 results.
    act = tl.math.div_rn(gate, 1.0 + tl.exp(-gate)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` along the last dimension, rounded as PyTorch rounds."""
    width = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], width, dtype=gate_up.dtype, device=gate_up.device)
    if out.numel():
        block = min(1024, triton.next_power_of_2(width))
        _silu_mul_kernel[(rows.shape[0], triton.cdiv(width, block))](
            rows, out, width, rows.stride(0), out.stride(0), BLOCK=block, num_warps=4 if block >= 512 else 1,
        )
    return out.view(*gate_up.shape[:-1], width)


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """transformers' gated activation ``act_fn(gate) * up`` with SiLU, in plain PyTorch: the kernel's semantics."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _bypassable(linear: nn.Module) -> bool:
    """Whether skipping the module's call loses nothing: no hooks and no forward of its own."""
    return not linear._forward_hooks and not linear._forward_pre_hooks and "forward" not in linear.__dict__


def _fusable(linears: list, storages: Counter, taken: set[int]) -> bool:
    """Plain float Linears of one dtype, device and input width whose parameters belong to nobody else.

    Subclasses (quantized linears) and tensor subclasses compute something else, accelerate hooks
    move weights around, and a parameter aliased elsewhere (shared storage, or a member of another
    group) would lose the alias when re-pointed.
    """
    if not all(type(m) is nn.Linear for m in linears):
        return False
    first = linears[0].weight
    params = [p for m in linears for p in (m.weight, m.bias) if p is not None]
    in_group = Counter(_storage(p) for p in params)
    return (
        all(not hasattr(m, "_hf_hook") and (m.bias is None) == (linears[0].bias is None) for m in linears)
        and all(
            type(p) is nn.Parameter and p.dtype == first.dtype and p.device == first.device
            and p.is_floating_point() and p.device.type != "meta" for p in params
        )
        and all(m.weight.dim() == 2 and m.weight.shape[1] == first.shape[1] for m in linears)
        and all(storages[_storage(p)] == in_group[_storage(p)] and id(p) not in taken for p in params)
    )


def _storage_counts(model: nn.Module) -> Counter:
    """How many of the model's parameters and buffers use each storage (tensor subclasses, which
    may have none, are never fused)."""
    tensors = (*model.parameters(), *model.buffers())
    return Counter(_storage(t) for t in tensors if type(t) in (torch.Tensor, nn.Parameter) and t.device.type != "meta")


def _concatenated(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors concatenated along the first dimension: a view when they already lie back to back
    in one storage (as an earlier build, for an earlier engine, left them), else a new tensor."""
    first, end = tensors[0], tensors[0].data_ptr()
    for t in tensors:
        if not t.is_contiguous() or _storage(t) != _storage(first) or t.data_ptr() != end:
            return torch.cat([t.detach() for t in tensors])
        end += t.numel() * t.element_size()
    shape = (sum(t.shape[0] for t in tensors), *first.shape[1:])
    return first.detach().as_strided(shape, torch.empty(shape, device="meta").stride())


def _version(x: torch.Tensor) -> int | None:
    # Inference tensors keep no version counter; nothing can modify them in place anyway.
    return None if x.is_inference() else x._version


class _Group:
    """Sibling Linears of one module, their parameters rows of one weight (and bias) tensor."""

    def __init__(self, owner: nn.Module, names: tuple[str, ...]) -> None:
        self.owner, self.names = owner, names
        self.device = getattr(owner, names[0]).weight.device
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self._stash: tuple[torch.Tensor, int | None, dict[int, torch.Tensor]] | None = None

    def members(self) -> list:
        return [getattr(self.owner, name, None) for name in self.names]

    def build(self) -> None:
        """Concatenate the members' current parameters and point each member at its rows."""
        self.linears = self.members()
        self.sizes = [m.weight.shape[0] for m in self.linears]
        self.weight = _concatenated([m.weight for m in self.linears])
        has_bias = self.linears[0].bias is not None
        self.bias = _concatenated([m.bias for m in self.linears]) if has_bias else None
        for i, (m, weight) in enumerate(zip(self.linears, self.weight.split(self.sizes))):
            m.weight.data = weight
            if has_bias:
                m.bias.data = self.bias.split(self.sizes)[i]
        self._layout = self._current_layout()

    def _current_layout(self) -> list:
        return [
            (id(m), *(None if p is None else (p.data_ptr(), p.shape, p.dtype, p.device) for p in (m.weight, m.bias)))
            for m in self.members()
        ]

    def current(self) -> bool:
        """Whether every member is still the module built on, holding the rows it was pointed at."""
        return self._current_layout() == self._layout

    def release(self) -> None:
        """Give members still holding rows of the concatenated tensors storage of their own, so
        that a group given up keeps no dead rows alive."""
        ours = {_storage(t) for t in (self.weight, self.bias) if t is not None}
        for m in self.linears:
            for p in (m.weight, m.bias):
                if p is not None and _storage(p) in ours:
                    p.data = p.detach().clone()
        self.weight = self.bias = None

    def forward_of(self, index: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Member ``index``'s forward while swapped: the first computes the group's GEMM, the others
        take their slice of it when given the same input."""
        linear = self.linears[index]

        def forward(x: torch.Tensor) -> torch.Tensor:
            if index:
                stash = self._stash
                if stash is None or stash[0] is not x or stash[1] != _version(x) or index not in stash[2]:
                    return F.linear(x, linear.weight, linear.bias)
                out = stash[2].pop(index)
                if not stash[2]:
                    self._stash = None  # the input is not kept alive longer than its last use
                return out
            parts = F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
            self._stash = (x, _version(x), dict(enumerate(parts[1:], start=1)))
            return parts[0]

        return forward

    def gated_mlp_forward(self, mlp: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The MLP's forward with this (gate, up) group: one GEMM, one kernel, ``down_proj``."""
        return lambda x: mlp.down_proj(silu_mul(F.linear(x, self.weight, self.bias)))


class FusedLinears:
    """The model's sibling projections fused into one GEMM each, and its SiLU-gated MLPs that the
    fused path reproduces, swapped in on demand."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        storages, taken = _storage_counts(model), set()
        self.groups: list[_Group] = []
        for module in model.modules():
            for names in SIBLINGS:
                linears = [getattr(module, name, None) for name in names]
                if _fusable(linears, storages, taken):
                    group = _Group(module, names)
                    group.build()
                    taken.update(id(p) for m in linears for p in m.parameters(recurse=False))
                    self.groups.append(group)
        gate_up = {group.owner: group for group in self.groups if group.names == SIBLINGS[1]}
        candidates = [
            (mlp, group) for mlp, group in gate_up.items()
            if isinstance(getattr(mlp, "act_fn", None), _SILU_TYPES) and isinstance(getattr(mlp, "down_proj", None), nn.Module)
            and not hasattr(mlp, "_hf_hook")
        ]
        kinds = {(type(mlp), type(mlp.act_fn)) for mlp, _ in candidates}
        verified = {kind: _reproduces(*next(c for c in candidates if (type(c[0]), type(c[0].act_fn)) == kind)) for kind in kinds}
        self.mlps = [(mlp, group) for mlp, group in candidates if verified[type(mlp), type(mlp.act_fn)]]

    def _ready(self, group: _Group) -> bool:
        """Whether the group's fused tensors match its members, rebuilding them if they do not (a group
        that can no longer be fused is given up)."""
        if group.current():
            return True
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return False  # a rebuild's copies would be captured into the graph; run unfused this time
        members = group.members()
        others = {id(p) for g in self.groups if g is not group for m in g.linears for p in m.parameters(recurse=False)}
        if _fusable(members, _storage_counts(self.model), others) and members[0].weight.device == group.device:
            group.build()
            return True
        group.release()
        self.groups.remove(group)
        return False

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Within the block, each group runs one GEMM and each verified gated MLP the fused path."""
        if torch.is_grad_enabled():  # the fused paths have no backward to the parameters
            yield
            return
        groups = [group for group in list(self.groups) if self._ready(group)]
        # Members with a forward of their own keep it: the fused GEMM would skip whatever it adds.
        groups = [group for group in groups if all("forward" not in m.__dict__ for m in group.linears)]
        patched = [(m, group.forward_of(i)) for group in groups for i, m in enumerate(group.linears)]
        # An MLP's replacement never calls gate_proj and up_proj, so their hooks would be skipped.
        active = set(map(id, groups))
        patched += [
            (mlp, group.gated_mlp_forward(mlp)) for mlp, group in self.mlps
            if id(group) in active and all(_bypassable(m) for m in group.linears)
        ]
        # An instance-level forward someone else installed comes back afterwards.
        saved = [module.__dict__.get("forward") for module, _ in patched]
        for module, forward in patched:
            module.forward = forward
        try:
            yield
        finally:
            for (module, _), forward in zip(patched, saved):
                if forward is None:
                    del module.forward  # the class's forward shows through again
                else:
                    module.forward = forward
            for group in groups:
                group._stash = None  # no step's activations outlive it


@torch.no_grad()
def _reproduces(mlp: nn.Module, group: _Group) -> bool:
    """Whether GEMM, kernel and ``down_proj`` match this MLP's own forward (within rounding) on random input."""
    weight = group.weight
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(4, weight.shape[1], generator=generator).to(weight.device, weight.dtype)
    # Gate pre-activations of a few units, where SiLU, GELU and friends differ clearly.
    gate = F.linear(x, group.linears[0].weight)
    x = x * (2.0 / gate.float().std().clamp(min=1e-6)).to(x.dtype)
    try:
        expected = mlp(x)
    except Exception:  # a different signature: not the MLP the fused path stands for
        return False
    got = group.gated_mlp_forward(mlp)(x)
    if not isinstance(expected, torch.Tensor) or expected.shape != got.shape:
        return False
    tolerance = 1e-4 if weight.dtype == torch.float32 else 2e-2
    scale = expected.float().abs().max().clamp(min=1e-6)
    return bool(((got.float() - expected.float()).abs().max() / scale) <= tolerance)
