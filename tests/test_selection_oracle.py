"""The oracle selection of benchmarks/selection_study.py (docs/selection.md, "an oracle ceiling").

Checked against a brute-force reading of its rule on a small paged pool: per draft row and KV head,
the ``sel_count`` positions below ``tail_start`` with the most of the row's own full causal
attention (averaged over the group's query heads), and the draft's output is attention over exactly
those positions plus its tail.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import torch

from hf_sparsespec.attention import reference
from hf_sparsespec.attention.context import StepContext

from conftest import REPO

_spec = importlib.util.spec_from_file_location("selection_study", REPO / "benchmarks" / "selection_study.py")
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)

PAGE, HKV, GROUP, DIM, LAYERS, WIDTH = 4, 2, 4, 8, 3, 12


def _step():
    """Two draft rows (one query each) and a verification row of three queries, pages shuffled."""
    g = torch.Generator().manual_seed(0)
    kv_len = [41, 29, 12]
    tail = [33, 20, 0]
    count = [10, 7, 0]
    pages_per_row = [(n + PAGE - 1) // PAGE for n in kv_len]
    physical = torch.randperm(sum(pages_per_row), generator=g).int()
    max_pages = max(pages_per_row)
    tables = torch.full((3, max_pages), -1, dtype=torch.int32)
    used = 0
    for r, p in enumerate(pages_per_row):
        tables[r, :p] = physical[used : used + p]
        used += p
    k_pool = torch.randn(used * PAGE, HKV, DIM, generator=g) * 2
    v_pool = torch.randn(used * PAGE, HKV, DIM, generator=g)
    q_len = [1, 1, 3]
    query = torch.randn(1, HKV * GROUP, sum(q_len), DIM, generator=g) * 2
    # The engine's own selection: the first `count` positions (what the oracle must replace).
    selection = torch.full((4, LAYERS, HKV, WIDTH), -1, dtype=torch.int32)
    slots = [2, 0, 1]
    for r in range(2):
        selection[slots[r], :, :, : count[r]] = torch.arange(count[r], dtype=torch.int32)
    sel_count = torch.zeros(4, dtype=torch.int32)
    for r in range(2):
        sel_count[slots[r]] = count[r]
    ctx = StepContext(
        cache=SimpleNamespace(page_size=PAGE),
        slot_mapping=torch.full((sum(q_len),), -1, dtype=torch.int64),
        q_start=torch.tensor([0, 1, 2], dtype=torch.int32),
        q_len=torch.tensor(q_len, dtype=torch.int32),
        kv_len=torch.tensor(kv_len, dtype=torch.int32),
        block_tables=tables,
        is_draft=torch.tensor([True, True, False]),
        tail_start=torch.tensor(tail, dtype=torch.int32),
        sel_slot=torch.tensor(slots, dtype=torch.int64),
        selection=selection,
        sel_count=sel_count,
        score_row=torch.full((3,), -1, dtype=torch.int64),
        scores=None,
        max_kv_len=max(kv_len),
    )
    return query, k_pool, v_pool, ctx


def _row_kv(pool, ctx, row):
    n = int(ctx.kv_len[row])
    return reference.gather_positions(pool, ctx.block_tables[row], torch.arange(n), PAGE)  # [n, H, D]


def _full_probs(query, k_pool, ctx, row, scale):
    """[Hq, kv_len] full attention of the row's single query (its position is the last)."""
    keys = _row_kv(k_pool, ctx, row)
    q = query[0, :, int(ctx.q_start[row])]  # [Hq, D]
    return torch.stack([torch.softmax(keys[:, hq // GROUP] @ q[hq] * scale, -1) for hq in range(HKV * GROUP)])


def test_oracle_selection_is_top_count_of_the_draft_querys_own_attention():
    query, k_pool, v_pool, ctx = _step()
    scale = DIM**-0.5
    engine_selection = ctx.selection.clone()
    layer = 1
    chosen = study.oracle_selection(query, k_pool, ctx, layer, scale)
    assert torch.equal(ctx.selection, engine_selection)  # the engine's tensor is untouched
    others = [l for l in range(LAYERS) if l != layer]
    assert torch.equal(chosen[:, others], engine_selection[:, others])
    for row in range(2):
        slot, tail, count = int(ctx.sel_slot[row]), int(ctx.tail_start[row]), int(ctx.sel_count[int(ctx.sel_slot[row])])
        probs = _full_probs(query, k_pool, ctx, row, scale)
        for h in range(HKV):
            mean = probs[h * GROUP : (h + 1) * GROUP].mean(0)[:tail]
            want = sorted(torch.argsort(mean, descending=True)[:count].tolist())
            got = chosen[slot, layer, h].tolist()
            assert got[:count] == want and all(p == -1 for p in got[count:])
            # No other set of `count` positions below the tail holds more of this query's attention.
            assert mean[want].sum() >= mean[:count].sum()
            assert got[:count] != list(range(count))  # it did replace the engine's choice
    untouched = [s for s in range(4) if s not in ctx.sel_slot[:2].tolist()]
    assert torch.equal(chosen[untouched], engine_selection[untouched])


def test_oracle_attention_reads_its_selection_and_the_tail():
    query, k_pool, v_pool, ctx = _step()
    scale = DIM**-0.5
    attention = study.reference_with_layer_views(set(), set(), oracle=True)
    layer = 2
    out = attention(query, k_pool, v_pool, ctx, layer, scale)[0]  # [T, Hq, D]
    chosen = study.oracle_selection(query, k_pool, ctx, layer, scale)
    for row in range(2):
        slot, tail, kv = int(ctx.sel_slot[row]), int(ctx.tail_start[row]), int(ctx.kv_len[row])
        count = int(ctx.sel_count[slot])
        keys, values = _row_kv(k_pool, ctx, row), _row_kv(v_pool, ctx, row)
        q = query[0, :, int(ctx.q_start[row])]
        for hq in range(HKV * GROUP):
            h = hq // GROUP
            visible = chosen[slot, layer, h, :count].tolist() + list(range(tail, kv))
            p = torch.softmax(keys[visible, h] @ q[hq] * scale, -1)
            torch.testing.assert_close(out[int(ctx.q_start[row]), hq], p @ values[visible, h])
    # The verification row is a full row: plain causal attention, as without the oracle.
    plain = reference.reference_attention(query, k_pool, v_pool, ctx, layer, scale)[0]
    torch.testing.assert_close(out[2:], plain[2:])
    assert not torch.allclose(out[:2], plain[:2])  # the drafts did read another selection
