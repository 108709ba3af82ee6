"""Properties of the misa ops over random small indexer sites, checked against the float64
references of kernels/reference.py and against the independent spellings in strategies.py.
Selections are compared by gathered scores and sets (assert_valid_topk), never by index order."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from misa_compile import MisaConfig, indexer_topk
from misa_compile.kernels import reference

from .strategies import (PROPERTY_SETTINGS, VISIBILITY_KINDS, assert_valid_topk, distinct_heads,
                         head_sets, indexer_problems, naive_hisa_block_scores,
                         naive_router_scores, naive_scores, naive_visibility, selection_sets)

ops = torch.ops.misa
SCALES = st.sampled_from((1.0, 0.125, 3.7))
SEEDS = st.integers(0, 2**16)
# Scaling w cannot rescale an additive mask, so that property holds only without one.
SCALE_INVARIANT_KINDS = tuple(kind for kind in VISIBILITY_KINDS if kind != "additive_mask")


def _config(problem, variant, **fields):
    defaults = dict(active_heads=problem.active_heads, block_size=problem.block_size,
                    hisa_block=problem.hisa_block)
    return MisaConfig(variant=variant, **{**defaults, **fields})


def _candidate_keys(problem, seed, width):
    """Distinct random key ids per query, with about a quarter replaced by invalid ids (-1 or
    past T), which rerank_topk must ignore."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.rand(problem.batch, problem.queries, problem.keys, generator=gen).argsort(-1)
    candidates = order[..., :width]
    invalid = torch.rand(candidates.shape, generator=gen) < 0.25
    return torch.where(invalid, torch.where(candidates % 2 == 0, -1, problem.keys + 3), candidates)


def _restricted(scores, candidates):
    """Scores [B, S, T] with every key outside the candidate ids set to -inf."""
    keys = scores.shape[-1]
    valid = (candidates >= 0) & (candidates < keys)
    # Invalid ids go to a spare column so they never unset a real candidate.
    allowed = torch.zeros(scores.shape[:-1] + (keys + 1,), dtype=torch.bool)
    allowed.scatter_(-1, torch.where(valid, candidates.long(), keys), True)
    return scores.masked_fill(~allowed[..., :keys], float("-inf"))


def _assert_selection_shape(values, indices, problem):
    shape = (problem.batch, problem.queries, min(problem.k_top, problem.keys))
    assert values.shape == shape and indices.shape == shape
    assert values.dtype == torch.float32 and indices.dtype == torch.int64


def assert_hisa_candidates(candidates, problem, block, num_blocks):
    """Candidates are whole kept blocks (ids past T as -1), and the kept blocks are the first and
    last visible block plus a top set of the signed block scores (ties unspecified); when every
    block is kept, the candidates are every key in order."""
    total = math.ceil(problem.keys / block)
    kept = min(num_blocks, total)
    if kept == total:  # every block kept: every key, in order
        expected = torch.arange(problem.keys).expand(problem.batch, problem.queries, -1)
        assert torch.equal(candidates, expected)
        return
    assert candidates.shape == (problem.batch, problem.queries, kept * block)
    groups = candidates.view(problem.batch, problem.queries, kept, block)
    blocks = groups[..., 0] // block
    expected = blocks[..., None] * block + torch.arange(block)
    assert torch.equal(groups, torch.where(expected < problem.keys, expected, -1))
    beta = naive_hisa_block_scores(problem, block)
    finite = beta.isfinite()
    tol = 1e-5 * (1 + torch.where(finite, beta, 0).abs().amax(-1, keepdim=True))
    # Blocks without visible keys rank last but still fill the kept slots.
    lowest = torch.where(finite, beta, math.inf).amin(-1, keepdim=True).nan_to_num(0, 0, 0) - 1e3
    ranked = torch.where(beta == -math.inf, lowest - 10 * tol, beta)
    assert_valid_topk(blocks, ranked, kept, tol=tol)


@PROPERTY_SETTINGS
@given(problem=indexer_problems(), scale=SCALES, seed=SEEDS)
def test_reference_agrees_with_naive_spelling(problem, scale, seed):
    vis = problem.visibility()
    torch.testing.assert_close(
        reference.dense_scores(problem.q, problem.k, problem.w, scale, **vis),
        naive_scores(problem, scale=scale))
    torch.testing.assert_close(
        reference.router_scores(problem.q, problem.k, problem.w, problem.block_size, **vis),
        naive_router_scores(problem, problem.block_size))
    heads = distinct_heads(problem, seed)
    torch.testing.assert_close(
        reference.routed_scores(problem.q, problem.k, problem.w, heads, scale, **vis),
        naive_scores(problem, heads, scale))


@PROPERTY_SETTINGS
@given(problem=indexer_problems(), scale=SCALES)
def test_dense_topk_matches_reference(problem, scale):
    vis = problem.visibility()
    values, indices = ops.dense_topk(problem.q, problem.k, problem.w, problem.k_top, scale, **vis)
    _assert_selection_shape(values, indices, problem)
    ref_values, _ = reference.dense_topk(problem.q, problem.k, problem.w, problem.k_top, scale,
                                         **vis)
    torch.testing.assert_close(values.double().sort(-1).values, ref_values.sort(-1).values,
                               rtol=1e-5, atol=1e-5)
    scores = reference.dense_scores(problem.q, problem.k, problem.w, scale, **vis)
    assert_valid_topk(indices, scores, problem.k_top, values)


@PROPERTY_SETTINGS
@given(problem=indexer_problems(), router=st.sampled_from(("score", "qnorm")))
def test_route_heads_picks_top_router_scores(problem, router):
    heads = ops.route_heads(problem.q, problem.k, problem.w, problem.active_heads,
                            problem.block_size, router, **problem.visibility())
    assert heads.shape == (problem.batch, problem.queries, problem.active_heads)
    assert heads.dtype == torch.int64
    if router == "score":
        scores = reference.router_scores(problem.q, problem.k, problem.w, problem.block_size,
                                         **problem.visibility())
    else:
        scores = problem.q.double().norm(dim=-1)
    assert_valid_topk(heads, scores, problem.active_heads)


@PROPERTY_SETTINGS
@given(problem=indexer_problems(), scale=SCALES, seed=SEEDS,
       index_dtype=st.sampled_from((torch.int64, torch.int32)))
def test_routed_topk_equals_gathered_head_formula(problem, scale, seed, index_dtype):
    heads = distinct_heads(problem, seed)
    values, indices = ops.routed_topk(problem.q, problem.k, problem.w, heads.to(index_dtype),
                                      problem.k_top, scale, **problem.visibility())
    _assert_selection_shape(values, indices, problem)
    assert_valid_topk(indices, naive_scores(problem, heads, scale), problem.k_top, values)


@PROPERTY_SETTINGS
@given(problem=indexer_problems(), scale=SCALES, seed=SEEDS, data=st.data())
def test_rerank_topk_is_dense_selection_among_candidates(problem, scale, seed, data):
    width = data.draw(st.integers(1, problem.keys), label="width")
    candidates = _candidate_keys(problem, seed, width)
    values, indices = ops.rerank_topk(problem.q, problem.k, problem.w, candidates, problem.k_top,
                                      scale, **problem.visibility())
    _assert_selection_shape(values, indices, problem)
    scores = reference.dense_scores(problem.q, problem.k, problem.w, scale, **problem.visibility())
    assert_valid_topk(indices, _restricted(scores, candidates), problem.k_top, values)


@PROPERTY_SETTINGS
@given(problem=indexer_problems(), data=st.data())
def test_hisa_candidates_keep_first_last_and_top_blocks(problem, data):
    total = math.ceil(problem.keys / problem.hisa_block)
    num_blocks = data.draw(st.integers(1, total + 1), label="num_blocks")
    candidates = ops.hisa_candidates(problem.q, problem.k, problem.w, problem.hisa_block,
                                     num_blocks, **problem.visibility())
    assert_hisa_candidates(candidates, problem, problem.hisa_block, num_blocks)


@PROPERTY_SETTINGS
@given(problem=indexer_problems())
def test_all_heads_active_equals_dense(problem):
    heads = problem.heads
    vis = problem.visibility()
    dense = reference.dense_scores(problem.q, problem.k, problem.w, **vis)
    config = _config(problem, "misa", active_heads=heads)
    values, indices = indexer_topk(problem.q, problem.k, problem.w, problem.k_top, config, **vis)
    assert_valid_topk(indices, dense, problem.k_top, values)
    ref_values, _ = reference.misa_topk(problem.q, problem.k, problem.w, problem.k_top, heads,
                                        problem.block_size, **vis)
    dense_values, _ = reference.dense_topk(problem.q, problem.k, problem.w, problem.k_top, **vis)
    torch.testing.assert_close(ref_values, dense_values)


@PROPERTY_SETTINGS
@given(problem=indexer_problems(), extra=st.integers(0, 3))
def test_misa_hier_with_every_key_a_candidate_equals_dense(problem, extra):
    vis = problem.visibility()
    candidates = max(problem.keys, problem.k_top) + extra
    config = _config(problem, "misa_hier", candidates=candidates)
    values, indices = indexer_topk(problem.q, problem.k, problem.w, problem.k_top, config, **vis)
    dense = reference.dense_scores(problem.q, problem.k, problem.w, **vis)
    assert_valid_topk(indices, dense, problem.k_top, values)
    ref_values, _ = reference.misa_hier_topk(problem.q, problem.k, problem.w, problem.k_top,
                                             problem.active_heads, problem.block_size, candidates,
                                             **vis)
    dense_values, _ = reference.dense_topk(problem.q, problem.k, problem.w, problem.k_top, **vis)
    torch.testing.assert_close(ref_values, dense_values)


@PROPERTY_SETTINGS
@given(problem=indexer_problems(), extra=st.integers(0, 2))
def test_hisa_keeping_every_block_equals_dense(problem, extra):
    vis = problem.visibility()
    every_block = math.ceil(problem.keys / problem.hisa_block) + extra
    config = _config(problem, "hisa", hisa_blocks=every_block)
    values, indices = indexer_topk(problem.q, problem.k, problem.w, problem.k_top, config, **vis)
    dense = reference.dense_scores(problem.q, problem.k, problem.w, **vis)
    assert_valid_topk(indices, dense, problem.k_top, values)
    ref_values, _ = reference.hisa_topk(problem.q, problem.k, problem.w, problem.k_top,
                                        problem.hisa_block, every_block, **vis)
    dense_values, _ = reference.dense_topk(problem.q, problem.k, problem.w, problem.k_top, **vis)
    torch.testing.assert_close(ref_values, dense_values)


@PROPERTY_SETTINGS
@given(problem=indexer_problems(), variant=st.sampled_from(("dense", "misa", "misa_hier", "hisa")),
       data=st.data())
def test_no_hidden_key_selected(problem, variant, data):
    """Every selected key is visible (naive_visibility), and a query that sees at least k_top
    keys gets k_top of them (HISA: of those in its kept blocks)."""
    vis = problem.visibility()
    candidates = problem.k_top + data.draw(st.integers(0, problem.keys), label="extra_candidates")
    hisa_blocks = data.draw(st.integers(1, math.ceil(problem.keys / problem.hisa_block)),
                            label="hisa_blocks")
    config = _config(problem, variant, candidates=candidates, hisa_blocks=hisa_blocks)
    values, indices = indexer_topk(problem.q, problem.k, problem.w, problem.k_top, config, **vis)
    visible = naive_visibility(problem)
    chosen = values.isfinite()
    assert visible.gather(-1, indices)[chosen].all(), "a hidden key was selected"
    if variant == "hisa":
        kept = ops.hisa_candidates(problem.q, problem.k, problem.w, problem.hisa_block,
                                   hisa_blocks, **vis)
        visible = visible & _restricted(torch.zeros(visible.shape), kept).isfinite()
    available = visible.sum(-1).clamp(max=problem.k_top)
    assert torch.equal(chosen.sum(-1), available), "a query got fewer visible keys than it sees"


def _scale_outputs(problem, w, seed):
    """Outputs of every op for weights w (all ops share the problem's other inputs)."""
    q, k, vis = problem.q, problem.k, problem.visibility()
    heads = distinct_heads(problem, seed)
    candidates = _candidate_keys(problem, seed, problem.keys)
    return {
        "dense_topk": ops.dense_topk(q, k, w, problem.k_top, **vis),
        "route_heads": ops.route_heads(q, k, w, problem.active_heads, problem.block_size, **vis),
        "routed_topk": ops.routed_topk(q, k, w, heads, problem.k_top, **vis),
        "rerank_topk": ops.rerank_topk(q, k, w, candidates, problem.k_top, **vis),
        "hisa_candidates": ops.hisa_candidates(q, k, w, problem.hisa_block, 2, **vis),
    }


@PROPERTY_SETTINGS
@given(problem=indexer_problems(kinds=SCALE_INVARIANT_KINDS), exponent=st.integers(-6, 6),
       factor=st.floats(0.01, 100.0), seed=SEEDS)
def test_positive_weight_scale_keeps_selection(problem, exponent, factor, seed):
    # A power of two scales every fp32 score exactly, so the selections must be identical.
    power = 2.0 ** exponent
    base = _scale_outputs(problem, problem.w, seed)
    scaled = _scale_outputs(problem, problem.w * power, seed)
    for name in ("dense_topk", "routed_topk", "rerank_topk"):
        (values, indices), (values_s, indices_s) = base[name], scaled[name]
        assert selection_sets(values, indices) == selection_sets(values_s, indices_s), name
        torch.testing.assert_close(values_s, values * power, rtol=0, atol=0, msg=name)
    assert head_sets(base["route_heads"]) == head_sets(scaled["route_heads"])
    assert torch.equal(base["hisa_candidates"].sort(-1).values,
                       scaled["hisa_candidates"].sort(-1).values)
    # Any other positive factor: still a top-k of the unscaled scores (ties aside).
    values, indices = ops.dense_topk(problem.q, problem.k, problem.w * factor, problem.k_top,
                                     **problem.visibility())
    dense = reference.dense_scores(problem.q, problem.k, problem.w, **problem.visibility())
    assert_valid_topk(indices, dense, problem.k_top, values / factor, rel_tol=1e-4)
    heads = ops.route_heads(problem.q, problem.k, problem.w * factor, problem.active_heads,
                            problem.block_size, **problem.visibility())
    router = reference.router_scores(problem.q, problem.k, problem.w, problem.block_size,
                                     **problem.visibility())
    assert_valid_topk(heads, router, problem.active_heads, rel_tol=1e-4)


@PROPERTY_SETTINGS
@given(problem=indexer_problems(), router=st.sampled_from(("score", "qnorm")), data=st.data())
def test_router_is_equivariant_to_head_permutation(problem, router, data):
    perm = torch.tensor(data.draw(st.permutations(range(problem.heads)), label="perm"))
    vis = problem.visibility()
    args = (problem.active_heads, problem.block_size, router)
    heads = ops.route_heads(problem.q, problem.k, problem.w, *args, **vis)
    permuted = ops.route_heads(problem.q[:, :, perm], problem.k, problem.w[:, :, perm], *args,
                               **vis)
    mapped_back = perm[permuted]
    if router == "score":
        scores = reference.router_scores(problem.q, problem.k, problem.w, problem.block_size, **vis)
    else:
        scores = problem.q.double().norm(dim=-1)
    assert_valid_topk(mapped_back, scores, problem.active_heads)
    # Where the h-th and (h+1)-th router scores are apart, the routed head sets are the same.
    ranked = scores.sort(-1, descending=True).values
    h = problem.active_heads
    if h < problem.heads:
        gap = ranked[..., h - 1] - ranked[..., h] > 1e-6 * (1 + ranked.abs().amax(-1))
    else:
        gap = torch.ones(scores.shape[:-1], dtype=torch.bool)
    rows = gap.flatten().tolist()
    for same, a, b in zip(rows, head_sets(heads), head_sets(mapped_back)):
        assert a == b or not same


@PROPERTY_SETTINGS
@given(problem=indexer_problems(), chunk=st.sampled_from((1, 2, 3)), seed=SEEDS)
def test_chunked_equals_unchunked(problem, chunk, seed):
    q, k, w, vis = problem.q, problem.k, problem.w, problem.visibility()
    heads = distinct_heads(problem, seed)
    candidates = _candidate_keys(problem, seed, problem.keys)
    dense = reference.dense_scores(q, k, w, **vis)
    selections = {
        "dense_topk": (lambda c: ops.dense_topk(q, k, w, problem.k_top, **vis, chunk=c), dense),
        "routed_topk": (lambda c: ops.routed_topk(q, k, w, heads, problem.k_top, **vis, chunk=c),
                        naive_scores(problem, heads)),
        "rerank_topk": (lambda c: ops.rerank_topk(q, k, w, candidates, problem.k_top, **vis,
                                                  chunk=c), _restricted(dense, candidates)),
    }
    for name, (run, scores) in selections.items():
        whole, chunked = run(0), run(chunk)
        torch.testing.assert_close(chunked[0], whole[0], rtol=1e-6, atol=1e-6, msg=name)
        assert_valid_topk(chunked[1], scores, problem.k_top, chunked[0])
    router = reference.router_scores(q, k, w, problem.block_size, **vis)
    for c in (0, chunk):
        routed = ops.route_heads(q, k, w, problem.active_heads, problem.block_size, **vis, chunk=c)
        assert_valid_topk(routed, router, problem.active_heads)
        kept = ops.hisa_candidates(q, k, w, problem.hisa_block, 2, **vis, chunk=c)
        assert_hisa_candidates(kept, problem, problem.hisa_block, 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@PROPERTY_SETTINGS
@given(data=st.data())
def test_half_precision_inputs(dtype, data):
    """fp16/bf16 inputs (and fp16/bf16 additive masks) are scored in fp32: the selection is a
    top-k of the float64 score of the same low-precision inputs."""
    problem = data.draw(indexer_problems(dtype=dtype), label="problem")
    q, k, w, vis = problem.q, problem.k, problem.w, problem.visibility()
    dense = reference.dense_scores(q, k, w, **vis)
    values, indices = ops.dense_topk(q, k, w, problem.k_top, **vis)
    _assert_selection_shape(values, indices, problem)
    assert_valid_topk(indices, dense, problem.k_top, values)
    heads = ops.route_heads(q, k, w, problem.active_heads, problem.block_size, **vis)
    assert_valid_topk(heads, reference.router_scores(q, k, w, problem.block_size, **vis),
                      problem.active_heads)
    values, indices = ops.routed_topk(q, k, w, heads, problem.k_top, **vis)
    assert_valid_topk(indices, naive_scores(problem, heads), problem.k_top, values)
    kept = ops.hisa_candidates(q, k, w, problem.hisa_block, 2, **vis)
    assert_hisa_candidates(kept, problem, problem.hisa_block, 2)
    values, indices = ops.rerank_topk(q, k, w, kept, problem.k_top, **vis)
    assert_valid_topk(indices, _restricted(dense, kept), problem.k_top, values)
