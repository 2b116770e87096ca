"""The engine's hot loop reads nothing back from the device, and reads results one iteration late.

On a GPU every host read of a device tensor (``.item()``, ``.tolist()``, ``bool(t)``, boolean-mask
indexing) stalls the host until the queue drains, which would serialise CPU bookkeeping and GPU work.
These tests count such reads on the CPU, where they are cheap but still visible at the Python level.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import hf_sparsespec
from hf_sparsespec.generation import engine as engine_module
from hf_sparsespec.generation import runner as runner_module
from conftest import tiny_model

HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")


@contextlib.contextmanager
def count_host_reads(counter: dict):
    """Count host reads of tensors while ``counter['armed']`` is set."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    original_getitem = torch.Tensor.__getitem__

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            if counter["armed"]:
                counter["reads"].append(name)
            return fn(self, *args, **kwargs)

        return counted

    def getitem(self, index):
        items = index if isinstance(index, tuple) else (index,)
        if counter["armed"] and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items):
            counter["reads"].append("boolean mask index")
        return original_getitem(self, index)

    try:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, wrap(name, fn))
        torch.Tensor.__getitem__ = getitem
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        torch.Tensor.__getitem__ = original_getitem


@pytest.mark.parametrize("do_sample", [False, True])
def test_launch_has_no_host_reads_outside_the_model(monkeypatch, do_sample):
    counter = {"armed": False, "reads": [], "launches": 0}
    original_launch = engine_module.Engine._launch
    original_forward = runner_module.ModelRunner.forward

    def launch(self, rows):
        counter["armed"] = True
        counter["launches"] += 1
        try:
            return original_launch(self, rows)
        finally:
            counter["armed"] = False

    def forward(self, views, scores, max_kv, *args, **kwargs):
        # The CPU reference attention reads row metadata on purpose; the GPU path runs Triton kernels.
        armed, counter["armed"] = counter["armed"], False
        try:
            return original_forward(self, views, scores, max_kv, *args, **kwargs)
        finally:
            counter["armed"] = armed

    monkeypatch.setattr(engine_module.Engine, "_launch", launch)
    monkeypatch.setattr(runner_module.ModelRunner, "forward", forward)
    model = tiny_model("qwen3")
    ids = torch.randint(3, 256, (3, 40))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    sampling = dict(do_sample=True, temperature=0.8, top_p=0.9, top_k=50, repetition_penalty=1.1) if do_sample else {}
    with count_host_reads(counter):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, custom_generate=hf_sparsespec.generate,
                       min_budget=4, draft_len=4, **sampling)
    assert counter["launches"] > 10
    assert counter["reads"] == []


def decode_recording_iterations(monkeypatch) -> list[tuple[str, int]]:
    """Events of a short speculative decode, in order: ("launch", i), ("absorb", i), and
    ("nothing to run", -1) when the scheduler found no row to queue."""
    events: list[tuple[str, int]] = []
    original_launch = engine_module.Engine._launch
    original_absorb = engine_module.Engine._absorb
    original_plan = engine_module.Scheduler.plan

    def plan(self):
        rows = original_plan(self)
        if not rows:
            events.append(("nothing to run", -1))
        return rows

    def launch(self, rows):
        results = original_launch(self, rows)
        results.iteration = len([e for e in events if e[0] == "launch"])
        events.append(("launch", results.iteration))
        return results

    def absorb(self, results):
        events.append(("absorb", results.iteration))
        return original_absorb(self, results)

    monkeypatch.setattr(engine_module.Engine, "_launch", launch)
    monkeypatch.setattr(engine_module.Engine, "_absorb", absorb)
    monkeypatch.setattr(engine_module.Scheduler, "plan", plan)
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (4, 30))
    model.generate(input_ids=ids, max_new_tokens=30, do_sample=False, custom_generate=hf_sparsespec.generate,
                   min_budget=4, draft_len=4)
    return events


def test_results_are_absorbed_one_iteration_late(monkeypatch):
    events = decode_recording_iterations(monkeypatch)
    assert len([e for e in events if e[0] == "launch"]) > 10
    for position, (kind, i) in enumerate(events):
        if kind == "absorb":
            # Either the next iteration was queued before the host looked at this one's results, or
            # every request was waiting for them and there was nothing to queue.
            assert events[position - 1] in (("launch", i + 1), ("nothing to run", -1)), events[: position + 1]


def test_a_slow_device_never_has_more_than_two_iterations_queued(monkeypatch):
    # On a device whose results are never ready early, the host reads iteration N as soon as N + 1
    # is queued, so a request that verified in N can run again in N + 2.
    monkeypatch.setattr(engine_module.StepResults, "ready", lambda self: False)
    events = decode_recording_iterations(monkeypatch)
    launched = [i for kind, i in events if kind == "launch"]
    assert len(launched) > 10
    absorbed_before = set()
    for kind, i in events:
        if kind == "absorb":
            absorbed_before.add(i)
        elif i >= 2:
            assert i - 2 in absorbed_before, f"iteration {i} was queued before {i - 2} was read: {events}"


def test_plain_decoding_queues_the_next_row_before_reading_a_token(monkeypatch):
    # speculate=False knows each next position at launch, so a request does not sit out the
    # iteration that brings its token to the host: the host never finds nothing to queue, except
    # while the first token (sampled at the end of the prompt) is on its way.
    empty_plans = []
    original_plan = engine_module.Scheduler.plan

    def plan(self):
        rows = original_plan(self)
        if not rows:
            empty_plans.append(len(self.active))
        return rows

    monkeypatch.setattr(engine_module.Scheduler, "plan", plan)
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (3, 20))
    out = model.generate(input_ids=ids, max_new_tokens=40, do_sample=False, custom_generate=hf_sparsespec.generate,
                         speculate=False)
    torch.testing.assert_close(out, model.generate(input_ids=ids, max_new_tokens=40, do_sample=False), rtol=0, atol=0)
    assert len(empty_plans) <= 3, empty_plans
