"""Visibility folding: masks built in the graph from positions become causal=True or key ranges
only where the graph proves them; masks the graph cannot see into (module inputs, run-time
offsets) stay masks. Every rewritten program selects exactly what eager selects."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import misa_compile

from .test_find_indexers import B, H, K, SCALE, einsum_masked_fill
from .test_rewrite_indexers import ALL_HEADS, check_selection, compile_with_rewrite, misa_ops


def indexer_scores(q, k, w):
    scores = torch.einsum("bshd,btd->bsht", q, k).relu() * SCALE
    return torch.einsum("bsht,bsh->bst", scores, w)


def visible_keys(queries, keys, offset, window=None, keep=None):
    """Query i sits at position offset + i and sees keys j <= its position (and, with a window,
    j > position - window); `keep` [B,T] hides padding keys."""
    query_pos = torch.arange(queries) + offset
    key_pos = torch.arange(keys)
    visible = key_pos[None, :] <= query_pos[:, None]
    if window is not None:
        visible = visible & (key_pos[None, :] > query_pos[:, None] - window)
    if keep is not None:
        visible = visible[None] & keep[:, None, :]
    return visible


def masked_indexer(offset, window=None):
    """An indexer whose mask the graph builds; `offset` is a Python int (a constant of the
    graph) or a 0-d int tensor input (a run-time value)."""
    def fn(q, k, w, keep, *runtime_offset):
        visible = visible_keys(q.shape[1], k.shape[1],
                               runtime_offset[0] if runtime_offset else offset, window, keep)
        return indexer_scores(q, k, w).masked_fill(~visible, float("-inf")).topk(K).indices
    return fn


def tensors(queries, keys, seed=0, padding=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, queries, H, 8, generator=g)
    k = torch.randn(B, keys, 8, generator=g)
    w = torch.randn(B, queries, H, generator=g)
    keep = torch.ones(B, keys, dtype=torch.bool)
    keep[-1, :padding] = False
    return q, k, w, keep


def rewrite_and_check(fn, args, queries, keys, offset, window=None):
    indices, report, gm = compile_with_rewrite(fn, args, ALL_HEADS)
    q, k, w, keep = args[:4]
    dense = indexer_scores(q, k, w).masked_fill(
        ~visible_keys(queries, keys, offset, window, keep), float("-inf"))
    check_selection(indices, dense)
    (record,) = report.rewritten
    return record, gm


def op_visibility(gm):
    """(causal, key ranges given, mask given) of the emitted misa selection op."""
    (op,) = [n for n in gm.graph.nodes if n.target == torch.ops.misa.routed_topk.default]
    causal, key_start, key_end, mask = op.args[6:10]
    return causal, key_start is not None and key_end is not None, mask is not None


def test_a_causal_mask_built_from_positions_becomes_causal_true_and_reads_no_mask():
    queries, keys = 5, 7
    record, gm = rewrite_and_check(masked_indexer(keys - queries), tensors(queries, keys),
                                   queries, keys, keys - queries)
    # The all-True padding mask is a graph input: it stays, as a cheap [B,1,T] broadcast.
    assert record.visibility == "causal+mask"
    assert op_visibility(gm) == (True, False, True)
    (op,) = [n for n in gm.graph.nodes if n.target == torch.ops.misa.routed_topk.default]
    assert op.args[9].meta["val"].stride()[1] == 0  # broadcast along the queries, not stored


def test_key_padding_built_from_an_input_stays_a_mask_next_to_causal():
    queries, keys = 5, 7
    record, _ = rewrite_and_check(masked_indexer(keys - queries),
                                  tensors(queries, keys, padding=3), queries, keys, keys - queries)
    assert record.visibility == "causal+mask"


def test_an_offset_other_than_t_minus_s_becomes_key_ranges_not_causal():
    queries, keys = 5, 7
    record, gm = rewrite_and_check(masked_indexer(0), tensors(queries, keys), queries, keys, 0)
    assert record.visibility == "ranges+mask"
    assert op_visibility(gm) == (False, True, True)


def test_a_run_time_position_offset_is_not_folded():
    queries, keys = 5, 7
    offset = torch.tensor(keys - queries)
    record, gm = rewrite_and_check(masked_indexer(None), tensors(queries, keys) + (offset,),
                                   queries, keys, keys - queries)
    assert record.visibility == "mask"
    assert op_visibility(gm) == (False, False, True)


def test_a_mask_passed_in_as_an_input_is_kept():
    queries, keys = 5, 7
    q, k, w, _ = tensors(queries, keys)
    visible = torch.rand(B, queries, keys, generator=torch.Generator().manual_seed(3)) > 0.3
    indices, report, gm = compile_with_rewrite(einsum_masked_fill, (q, k, w, visible), ALL_HEADS)
    check_selection(indices, indexer_scores(q, k, w).masked_fill(~visible, float("-inf")))
    assert [r.visibility for r in report.rewritten] == ["mask"]
    assert op_visibility(gm) == (False, False, True)


def test_an_int_offset_under_dynamic_shapes_is_guarded_or_left_as_a_mask():
    """Under dynamic=True an int argument becomes a symbol; j <= i + offset is causal only if
    offset == T - S is statically known, which it is not: the mask stays."""
    def fn(q, k, w, offset: int):
        visible = visible_keys(q.shape[1], k.shape[1], offset)
        return indexer_scores(q, k, w).masked_fill(~visible, float("-inf")).topk(K).indices

    misa_compile.backend.clear_reports()
    compiled = torch.compile(fn, backend="misa", dynamic=True, fullgraph=True,
                             options=dict(active_heads=H, block_size=2, target="aot_eager"))
    for queries, keys, offset in ((5, 7, 2), (5, 7, 0), (4, 9, 5), (4, 9, 1)):
        q, k, w, _ = tensors(queries, keys, seed=offset)
        with torch.no_grad():
            indices = compiled(q, k, w, offset)
        check_selection(indices, indexer_scores(q, k, w).masked_fill(
            ~visible_keys(queries, keys, offset), float("-inf")))
    assert {r.visibility for r in misa_compile.backend.last_report().rewritten} <= {"mask"}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(queries=st.integers(1, 6), extra_keys=st.integers(0, 5), shift=st.integers(-3, 3),
       window=st.one_of(st.none(), st.integers(1, 6)), padding=st.integers(0, 4),
       runtime_offset=st.booleans(), seed=st.integers(0, 3))
def test_mask_programs_rewrite_to_what_eager_selects(queries, extra_keys, shift, window,
                                                     padding, runtime_offset, seed):
    """Generated mask programs (causal with any offset, sliding windows, key padding, a run-time
    offset): the rewrite selects what eager does, and folds exactly the proven part."""
    torch._dynamo.reset()
    keys = max(queries + extra_keys, K)
    offset = keys - queries + shift
    args = tensors(queries, keys, seed=seed, padding=min(padding, keys))
    if runtime_offset:
        fn, args = masked_indexer(None, window), args + (torch.tensor(offset),)
    else:
        fn = masked_indexer(offset, window)
    record, gm = rewrite_and_check(fn, args, queries, keys, offset, window)
    if runtime_offset:
        expected = "mask"
    elif shift == 0 and window is None:
        expected = "causal+mask"
    else:
        expected = "ranges+mask"
    assert record.visibility == expected, (record, misa_ops(gm))


def test_constant_true_factors_fold_away_whatever_their_spelling():
    """Inductor's decompositions spell new_ones((), dtype=bool) as full([], True)."""
    queries, keys = 5, 7

    def fn(q, k, w, keep):
        visible = visible_keys(queries, keys, keys - queries) & torch.full((), True)
        visible = visible & torch.ones(1, keys, dtype=torch.bool)
        return indexer_scores(q, k, w).masked_fill(~visible, float("-inf")).topk(K).indices

    indices, report, _ = compile_with_rewrite(fn, tensors(queries, keys), ALL_HEADS)
    assert [r.visibility for r in report.rewritten] == ["causal"]


def test_symbolic_cache_positions_ending_at_t_fold_into_causal_under_dynamic_shapes():
    """Positions arange(past, past + S) with past = T - S: causal for every size, proven
    symbolically (no recompile per length)."""
    def fn(q, k, w):
        queries, keys = q.shape[1], k.shape[1]
        past = keys - queries
        query_pos = torch.arange(past, past + queries)
        visible = torch.arange(keys)[None, :] <= query_pos[:, None]
        return indexer_scores(q, k, w).masked_fill(~visible, float("-inf")).topk(K).indices

    misa_compile.backend.clear_reports()
    compiled = torch.compile(fn, backend="misa", dynamic=True, fullgraph=True,
                             options=dict(active_heads=H, block_size=2, target="aot_eager"))
    for queries, keys in ((5, 7), (4, 11)):
        q, k, w, _ = tensors(queries, keys)
        with torch.no_grad():
            indices = compiled(q, k, w)
        check_selection(indices, indexer_scores(q, k, w).masked_fill(
            ~visible_keys(queries, keys, keys - queries), float("-inf")))
    assert [r.visibility for r in misa_compile.backend.last_report().rewritten] == ["causal"]
