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
    elif shift == 0:
        # A window's far edge is a key_start next to causal=True.
        expected = "causal+mask" if window is None else "causal+ranges+mask"
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


# --- packed sequences: transformers' labels of position_ids, folded into ragged key ranges -----

PACKED = 12  # S == T, as create_causal_mask has them


def transformers_labels(positions):
    """find_packed_sequence_indices: a new label wherever the position does not step by 1."""
    first = positions[:, :1] - 1
    return (torch.diff(positions, prepend=first, dim=-1) != 1).cumsum(-1)


def sliced_labels(positions):
    """The same labels spelled with slices, a zero first step, ~(d == 1) and a long cast (every
    label one more: only equality of labels matters)."""
    step = positions[:, 1:] - positions[:, :-1]
    d = torch.cat([torch.zeros_like(positions[:, :1]), step], -1)
    return (~(d == 1)).long().cumsum(-1)


def same_label(labels):
    return labels[:, :, None] == labels[:, None, :]


def causal_positions(positions):
    return positions[:, None, :] <= positions[:, :, None]


def packed_indexer(visible_fn):
    """An indexer whose mask visible_fn(positions, other) [B,S,T] builds from its inputs."""
    def fn(q, k, w, positions, other):
        visible = visible_fn(positions, other)
        return indexer_scores(q, k, w).masked_fill(~visible, float("-inf")).topk(K).indices
    return fn


def packed_positions(*lengths_per_row):
    """[B, sum(lengths)] positions restarting at 0 for each packed sequence."""
    return torch.stack([torch.cat([torch.arange(n) for n in lengths])
                        for lengths in lengths_per_row])


PACKINGS = {"one sequence": ((PACKED,), (PACKED,)),
            "packed": ((5, 4, 3), (5, 4, 3)),
            "packed differently per row": ((2, 7, 3), (1, 1, 10))}


def rewrite_packed(visible_fn, packing, other=None):
    """Compiles packed_indexer(visible_fn) with the rewrite and checks its selection against
    eager: (report record, rewritten graph)."""
    torch._dynamo.reset()
    positions = packed_positions(*PACKINGS[packing])
    other = positions if other is None else other
    q, k, w, _ = tensors(PACKED, PACKED, seed=len(packing))
    fn = packed_indexer(visible_fn)
    indices, report, gm = compile_with_rewrite(fn, (q, k, w, positions, other), ALL_HEADS)
    dense = indexer_scores(q, k, w).masked_fill(~visible_fn(positions, other), float("-inf"))
    check_selection(indices, dense)
    (record,) = report.rewritten
    return record, gm


@pytest.mark.parametrize("packing", sorted(PACKINGS))
@pytest.mark.parametrize("labels", [transformers_labels, sliced_labels])
def test_a_packed_causal_mask_becomes_segment_ranges_and_no_mask(labels, packing):
    """L[q] == L[kv] and P[kv] <= P[q]: on one run of labels P steps with the index, so the mask
    is the run's start (key_start) and causal=True, with no [S,T] tensor read."""
    def visible(positions, _):
        return same_label(labels(positions)) & causal_positions(positions)

    record, gm = rewrite_packed(visible, packing)
    assert record.visibility == "causal+ranges"
    assert op_visibility(gm) == (True, True, False)
    assert torch.ops.aten.cummax.default in [n.target for n in gm.graph.nodes]


@pytest.mark.parametrize("packing", sorted(PACKINGS))
def test_a_packed_sliding_window_and_a_segment_alone_become_ranges(packing):
    """A window P[q] - P[kv] < 3 on the segment (causal=True and a key_start), and the segment
    without any causal bound (its key_end must then be applied)."""
    def window(positions, _):
        gap = positions[:, :, None] - positions[:, None, :]
        return same_label(transformers_labels(positions)) & (gap < 3) & (gap >= 0)

    def segment_only(positions, _):
        return same_label(transformers_labels(positions))

    for visible, causal in ((window, True), (segment_only, False)):
        record, gm = rewrite_packed(visible, packing)
        assert record.visibility == ("causal+ranges" if causal else "ranges"), visible.__name__
        assert op_visibility(gm) == (causal, True, False)


def diff_is_not_one_but_two(positions):
    first = positions[:, :1] - 1
    return (torch.diff(positions, prepend=first, dim=-1) != 2).cumsum(-1)


def cumsum_of_steps(positions):
    """A cumsum, but of integers that may be negative or above 1: labels not proven monotone."""
    first = positions[:, :1] - 1
    return (torch.diff(positions, prepend=first, dim=-1) - 1).cumsum(-1)


def other_batch_row(positions, query=True, key=True):
    """P[b', kv] <= P[b'', q] with b' and/or b'' = B-1-b: the position bound reads another batch
    row than the labels at the query, at the key, or both."""
    flipped = positions[torch.arange(positions.shape[0] - 1, -1, -1)]
    at_query = flipped if query else positions
    at_key = flipped if key else positions
    return at_key[:, None, :] <= at_query[:, :, None]


def at_or_after_the_query_run(positions):
    """L[kv] >= L[q] alone: keys of later runs pass too, where P[kv] - P[q] != kv - q."""
    labels = transformers_labels(positions)
    return labels[:, None, :] >= labels[:, :, None]


def at_or_before_the_query_run(positions):
    """L[kv] <= L[q] alone: keys of earlier runs pass too."""
    labels = transformers_labels(positions)
    return labels[:, None, :] <= labels[:, :, None]


NEAR_MISSES = {
    # labels that are not the segments of P: the causal bound on positions stays a mask
    "diff compared to 2": lambda p, _: same_label(diff_is_not_one_but_two(p))
    & causal_positions(p),
    "cumsum not of 0/1": lambda p, _: same_label(cumsum_of_steps(p)) & causal_positions(p),
    "labels of another P": lambda p, other: same_label(transformers_labels(other))
    & causal_positions(p),
    "another batch row": lambda p, _: same_label(transformers_labels(p)) & other_batch_row(p),
    "another batch row at the query": lambda p, _: same_label(transformers_labels(p))
    & other_batch_row(p, key=False),
    "another batch row at the key": lambda p, _: same_label(transformers_labels(p))
    & other_batch_row(p, query=False),
    "no same-segment condition": lambda p, _: causal_positions(p),
    "the same-segment condition's first half": lambda p, _: at_or_after_the_query_run(p)
    & causal_positions(p),
    "the same-segment condition's second half": lambda p, _: at_or_before_the_query_run(p)
    & causal_positions(p),
}


@pytest.mark.parametrize("name", sorted(NEAR_MISSES))
def test_position_bounds_not_proven_on_one_segment_stay_a_mask(name):
    """Each near miss selects what eager selects and keeps (part of) its mask: only the bound on
    the positions is unproven (monotone labels alone may still fold into segment ranges)."""
    other = packed_positions((3, 3, 6), (6, 6)) if name == "labels of another P" else None
    record, gm = rewrite_packed(NEAR_MISSES[name], "packed differently per row", other)
    assert "mask" in record.visibility, record
    assert op_visibility(gm)[2]
