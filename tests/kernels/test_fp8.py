"""FP8 e4m3 inputs with dequantization scales (q_scale per query token and head, k_scale per key
token), as DeepSeek-V3.2's indexer stores them: every op computes its usual math on the real
values q.float() * q_scale[..., None] and k.float() * k_scale[..., None].

Checked: each op (chunked torch implementation) against the float64 references on the same FP8
inputs and scales, and bit for bit against the same op on the dequantized fp32 inputs; scales of
1 equal no scales; scales on bf16/fp32 inputs mean the same; indexer_topk passes the scales to
every op of each variant; the validation errors; opcheck of the new arguments; and, under
TRITON_INTERPRET=1, the Triton path (the CUDA registrations run on CPU tensors), whose FP8 dots
the interpreter computes exactly. Selections are compared by gathered scores or sets."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from misa_compile import MisaConfig, indexer_topk
from misa_compile.kernels import reference, torch_impl

from .strategies import (PROPERTY_SETTINGS, assert_valid_topk, distinct_heads, head_sets,
                         indexer_problems, selection_sets)
from .test_ops_properties import _candidate_keys, _restricted, assert_hisa_candidates

ops = torch.ops.misa
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
SEEDS = st.integers(0, 2**16)
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def quantize(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x8, scale): per-row (last axis) FP8 quantization of x after a random per-row gain of
    2^-4..2^4, so that the scales differ a lot between rows and a bug that drops them shows."""
    gain = torch.exp2(torch.randint(-4, 5, x.shape[:-1], generator=gen).float())
    x = x.float() * gain[..., None]
    scale = (x.abs().amax(-1) / FP8_MAX).clamp_min(1e-6)
    return (x / scale[..., None]).to(FP8), scale


def quantized(problem, seed: int):
    """The problem's q and k as FP8 + scales: (q8, k8, q_scale, k_scale)."""
    gen = torch.Generator().manual_seed(seed)
    q8, q_scale = quantize(problem.q, gen)
    k8, k_scale = quantize(problem.k, gen)
    return q8, k8, q_scale, k_scale


def real_problem(problem, q8, k8, q_scale, k_scale):
    """The same site with the dequantized float64 q and k (what the references score)."""
    q, k = reference.dequantized(q8, k8, q_scale, k_scale)
    return problem.with_inputs(q=q, k=k)


def dequantized_fp32(q8, k8, q_scale, k_scale):
    """fp32 real values, spelled here rather than through torch_impl.dequantize."""
    return q8.float() * q_scale[..., None], k8.float() * k_scale[..., None]


@PROPERTY_SETTINGS
@given(problem=indexer_problems(), seed=SEEDS, scale=st.sampled_from((1.0, 0.3)))
def test_dense_and_routed_topk_match_the_reference(problem, seed, scale):
    q8, k8, q_scale, k_scale = quantized(problem, seed)
    vis = problem.visibility()
    scales = dict(q_scale=q_scale, k_scale=k_scale)
    values, indices = ops.dense_topk(q8, k8, problem.w, problem.k_top, scale, **vis, **scales)
    scores = reference.dense_scores(q8, k8, problem.w, scale, **vis, **scales)
    assert_valid_topk(indices, scores, problem.k_top, values)
    heads = distinct_heads(problem, seed)
    values, indices = ops.routed_topk(q8, k8, problem.w, heads, problem.k_top, scale, **vis,
                                      **scales)
    routed = reference.routed_scores(q8, k8, problem.w, heads, scale, **vis, **scales)
    assert_valid_topk(indices, routed, problem.k_top, values)


@PROPERTY_SETTINGS
@given(problem=indexer_problems(), seed=SEEDS, router=st.sampled_from(("score", "qnorm")))
def test_route_heads_matches_the_reference(problem, seed, router):
    q8, k8, q_scale, k_scale = quantized(problem, seed)
    heads = ops.route_heads(q8, k8, problem.w, problem.active_heads, problem.block_size, router,
                            **problem.visibility(), q_scale=q_scale, k_scale=k_scale)
    if router == "score":
        scores = reference.router_scores(q8, k8, problem.w, problem.block_size,
                                         **problem.visibility(), q_scale=q_scale,
                                         k_scale=k_scale)
    else:
        scores = reference.dequantized(q8, k8, q_scale, k_scale)[0].norm(dim=-1)
    assert_valid_topk(heads, scores, problem.active_heads)


@PROPERTY_SETTINGS
@given(problem=indexer_problems(), seed=SEEDS, data=st.data())
def test_rerank_and_hisa_match_the_reference(problem, seed, data):
    q8, k8, q_scale, k_scale = quantized(problem, seed)
    vis = problem.visibility()
    scales = dict(q_scale=q_scale, k_scale=k_scale)
    width = data.draw(st.integers(1, problem.keys), label="width")
    candidates = _candidate_keys(problem, seed, width)
    values, indices = ops.rerank_topk(q8, k8, problem.w, candidates, problem.k_top, 0.5, **vis,
                                      **scales)
    scores = reference.dense_scores(q8, k8, problem.w, 0.5, **vis, **scales)
    assert_valid_topk(indices, _restricted(scores, candidates), problem.k_top, values)
    kept = ops.hisa_candidates(q8, k8, problem.w, problem.hisa_block, 2, **vis, **scales)
    assert_hisa_candidates(kept, real_problem(problem, q8, k8, q_scale, k_scale),
                           problem.hisa_block, 2)


@PROPERTY_SETTINGS
@given(problem=indexer_problems(), seed=SEEDS)
def test_every_op_equals_the_op_on_dequantized_inputs(problem, seed):
    """Dequantizing is all the scales do: the same op on the fp32 real values gives the same
    bits (the torch implementation runs the identical math after dequantizing)."""
    q8, k8, q_scale, k_scale = quantized(problem, seed)
    q32, k32 = dequantized_fp32(q8, k8, q_scale, k_scale)
    scales = dict(q_scale=q_scale, k_scale=k_scale)
    for got, want in zip(_every_op(problem, q8, k8, seed, scales),
                         _every_op(problem, q32, k32, seed, {})):
        assert torch.equal(got, want)


def _every_op(problem, q, k, seed, scales):
    vis = problem.visibility()
    heads = distinct_heads(problem, seed)
    candidates = _candidate_keys(problem, seed, problem.keys)
    return (*ops.dense_topk(q, k, problem.w, problem.k_top, 0.7, **vis, **scales),
            ops.route_heads(q, k, problem.w, problem.active_heads, problem.block_size, **vis,
                            **scales),
            *ops.routed_topk(q, k, problem.w, heads, problem.k_top, **vis, **scales),
            *ops.rerank_topk(q, k, problem.w, candidates, problem.k_top, **vis, **scales),
            ops.hisa_candidates(q, k, problem.w, problem.hisa_block, 2, **vis, **scales))


@PROPERTY_SETTINGS
@given(problem=indexer_problems(), seed=SEEDS)
def test_scales_of_one_equal_no_scales(problem, seed):
    q8, k8, _, _ = quantized(problem, seed)
    ones = dict(q_scale=torch.ones(problem.w.shape), k_scale=torch.ones(problem.k.shape[:2]))
    for got, want in zip(_every_op(problem, q8, k8, seed, ones),
                         _every_op(problem, q8, k8, seed, {})):
        assert torch.equal(got, want)


@PROPERTY_SETTINGS
@given(problem=indexer_problems(), seed=SEEDS, dtype=st.sampled_from((torch.float32,
                                                                       torch.bfloat16)))
def test_scales_on_wider_inputs_mean_the_same(problem, seed, dtype):
    """A scale on a bf16/fp32 q or k multiplies it the same way as on FP8."""
    gen = torch.Generator().manual_seed(seed)
    q, k = problem.q.to(dtype), problem.k.to(dtype)
    q_scale = torch.rand(problem.w.shape, generator=gen) + 0.1
    k_scale = torch.rand(problem.k.shape[:2], generator=gen) + 0.1
    vis = problem.visibility()
    values, indices = ops.dense_topk(q, k, problem.w, problem.k_top, **vis, q_scale=q_scale,
                                     k_scale=k_scale)
    scores = reference.dense_scores(q, k, problem.w, **vis, q_scale=q_scale, k_scale=k_scale)
    assert_valid_topk(indices, scores, problem.k_top, values)


@pytest.mark.parametrize("variant", ["dense", "misa", "misa_hier", "hisa"])
def test_indexer_topk_passes_the_scales_to_every_op(variant):
    gen = torch.Generator().manual_seed(3)
    q8, q_scale = quantize(torch.randn(2, 9, 4, 16, generator=gen), gen)
    k8, k_scale = quantize(torch.randn(2, 40, 16, generator=gen), gen)
    w = torch.randn(2, 9, 4, generator=gen)
    q32, k32 = dequantized_fp32(q8, k8, q_scale, k_scale)
    config = MisaConfig(variant, active_heads=2, block_size=8, candidates=12, hisa_block=8,
                        hisa_blocks=2)
    got = indexer_topk(q8, k8, w, 6, config, q_scale=q_scale, k_scale=k_scale)
    want = indexer_topk(q32, k32, w, 6, config)
    assert selection_sets(*got) == selection_sets(*want)
    unscaled = indexer_topk(q8, k8, w, 6, config)
    assert selection_sets(*unscaled) != selection_sets(*want), "the scales changed nothing"


# --- validation ---------------------------------------------------------------------------------


def _site(q_dtype=FP8, k_dtype=FP8):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 3, 2, 4, generator=gen).to(q_dtype)
    k = torch.randn(1, 5, 4, generator=gen).to(k_dtype)
    w = torch.randn(1, 3, 2, generator=gen)
    return q, k, w, torch.ones(1, 3, 2), torch.ones(1, 5)


def test_fp8_without_scales_means_scale_one():
    q, k, w, _, _ = _site()
    values, indices = ops.dense_topk(q, k, w, 3)
    want_values, want_indices = ops.dense_topk(q.float(), k.float(), w, 3)
    assert torch.equal(values, want_values) and torch.equal(indices, want_indices)


@pytest.mark.parametrize("dtype", [torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float64])
@pytest.mark.parametrize("name", ["q", "k"])
def test_other_dtypes_are_refused_naming_the_allowed_ones(name, dtype):
    q, k, w, _, _ = _site()
    args = dict(q=q, k=k, w=w)
    args[name] = args[name].float().to(dtype)
    with pytest.raises(TypeError, match=rf"{name} has dtype {dtype}; allowed dtypes are "
                                        r".*torch.float8_e4m3fn"):
        ops.dense_topk(args["q"], args["k"], args["w"], 3)


def test_fp8_weights_are_refused():
    q, k, w, _, _ = _site()
    with pytest.raises(TypeError, match=r"w has dtype torch.float8_e4m3fn; allowed dtypes are "
                                        r"torch.float32, torch.bfloat16, torch.float16$"):
        ops.route_heads(q, k, w.to(FP8), 1)


@pytest.mark.parametrize("name,bad,error,message", [
    ("q_scale", lambda s: s.double(), TypeError, r"q_scale has dtype torch.float64; allowed: "
                                                 r"torch.float32"),
    ("k_scale", lambda s: s.bfloat16(), TypeError, r"k_scale has dtype torch.bfloat16"),
    ("q_scale", lambda s: s[..., :1], ValueError, r"q_scale has shape \(1, 3, 1\), expected "
                                                  r"\[B, S, H\] = \[1, 3, 2\]"),
    ("k_scale", lambda s: s[None], ValueError, r"k_scale has shape \(1, 1, 5\), expected "
                                               r"\[B, T\] = \[1, 5\]"),
    ("k_scale", lambda s: s.to("meta"), ValueError, r"k_scale is on meta but q is on cpu"),
    ("q_scale", lambda s: s.index_fill(2, torch.tensor([1]), 0.0), ValueError,
     r"q_scale\[0, 0, 1\] = 0.0; every scale must be finite and > 0 \(a zero or negative scale "
     r"would change the ranking"),
    ("k_scale", lambda s: s.index_fill(1, torch.tensor([3]), -2.0), ValueError,
     r"k_scale\[0, 3\] = -2.0; every scale must be finite and > 0"),
    ("k_scale", lambda s: s.index_fill(1, torch.tensor([4]), float("nan")), ValueError,
     r"k_scale\[0, 4\] = nan"),
    ("q_scale", lambda s: s.index_fill(1, torch.tensor([2]), float("inf")), ValueError,
     r"q_scale\[0, 2, 0\] = inf"),
])
@pytest.mark.parametrize("op_name", ["dense_topk", "route_heads", "routed_topk", "rerank_topk",
                                     "hisa_candidates"])
def test_bad_scales_are_refused_by_every_op(op_name, name, bad, error, message):
    q, k, w, q_scale, k_scale = _site()
    scales = dict(q_scale=q_scale, k_scale=k_scale)
    scales[name] = bad(scales[name])
    call = {"dense_topk": lambda: ops.dense_topk(q, k, w, 2, **scales),
            "route_heads": lambda: ops.route_heads(q, k, w, 1, **scales),
            "routed_topk": lambda: ops.routed_topk(q, k, w, torch.zeros(1, 3, 1, dtype=torch.long),
                                                   2, **scales),
            "rerank_topk": lambda: ops.rerank_topk(q, k, w, torch.zeros(1, 3, 2, dtype=torch.long),
                                                   2, **scales),
            "hisa_candidates": lambda: ops.hisa_candidates(q, k, w, 2, 1, **scales)}[op_name]
    with pytest.raises(error, match=rf"misa.{op_name}: {message}"):
        call()


@pytest.mark.parametrize("op_name", ["dense_topk", "route_heads", "routed_topk", "rerank_topk",
                                     "hisa_candidates"])
@pytest.mark.parametrize("dtype", [FP8, torch.float32])
def test_opcheck_with_scales(op_name, dtype):
    q, k, w, q_scale, k_scale = _site(dtype, dtype)
    scales = dict(q_scale=q_scale * 0.5, k_scale=k_scale * 3)
    heads = torch.zeros(1, 3, 1, dtype=torch.long)
    candidates = torch.tensor([[[0, 1], [2, 3], [4, -1]]])
    op, args = {"dense_topk": (ops.dense_topk, (q, k, w, 2)),
                "route_heads": (ops.route_heads, (q, k, w, 1)),
                "routed_topk": (ops.routed_topk, (q, k, w, heads, 2)),
                "rerank_topk": (ops.rerank_topk, (q, k, w, candidates, 2)),
                "hisa_candidates": (ops.hisa_candidates, (q, k, w, 2, 1))}[op_name]
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
             "test_aot_dispatch_dynamic")
    # opcheck's own schema test multiplies the inputs, which torch cannot do in FP8.
    utils += ("test_schema",) if dtype != FP8 else ()
    assert torch.library.opcheck(op, args, scales, test_utils=utils) == {
        name: "SUCCESS" for name in utils}


# --- the Triton path under the interpreter ------------------------------------------------------

if INTERPRETER:
    from misa_compile.kernels.triton import register as cuda_ops
    from misa_compile.kernels.triton.scoring.router_scores import pooled_keys


def _triton_site(seed, batch=1, queries=20, keys=70, heads=4, dim=32, k_dtype=FP8):
    gen = torch.Generator().manual_seed(seed)
    q8, q_scale = quantize(torch.randn(batch, queries, heads, dim, generator=gen), gen)
    k_real = torch.randn(batch, keys, dim, generator=gen)
    if k_dtype == FP8:
        k, k_scale = quantize(k_real, gen)
    else:
        k, k_scale = k_real.to(k_dtype), torch.rand(batch, keys, generator=gen) + 0.5
    w = torch.randn(batch, queries, heads, generator=gen).bfloat16()
    return q8, k, w, q_scale, k_scale


def _assert_selection_scores(values, indices, scores, k_top):
    """The chosen keys are a top-k of the float64 scores (ties aside), values carry them."""
    assert_valid_topk(indices, scores, k_top, values, rel_tol=2e-6)


@pytest.mark.skipif(not INTERPRETER, reason="CPU interpreter tests (the GPU has tests/gpu)")
@pytest.mark.parametrize("k_dtype", [FP8, torch.bfloat16])
@pytest.mark.parametrize("queries,causal,ragged", [(20, True, False), (18, False, True),
                                                   (2, False, True)])
def test_triton_scored_topk_with_fp8(k_dtype, queries, causal, ragged):
    """Dense and routed selection through the CUDA registrations: both FP8 (FP8 dots) and FP8 q
    beside a bf16 k (fp32 dots in the interpreter); 2 queries take the decode kernel."""
    q8, k, w, q_scale, k_scale = _triton_site(queries, queries=queries, k_dtype=k_dtype)
    gen = torch.Generator().manual_seed(1)
    ks = torch.randint(0, 30, (1, queries), generator=gen) if ragged else None
    ke = ks + torch.randint(0, 60, (1, queries), generator=gen) if ragged else None
    vis = (causal, ks, ke, None, 0, q_scale, k_scale)
    scales = dict(q_scale=q_scale, k_scale=k_scale)
    values, indices = cuda_ops.CUDA_IMPLEMENTATIONS["dense_topk"](q8, k, w, 12, 0.5, *vis)
    scores = reference.dense_scores(q8, k, w, 0.5, causal, ks, ke, **scales)
    _assert_selection_scores(values, indices, scores, 12)
    heads = cuda_ops.CUDA_IMPLEMENTATIONS["route_heads"](q8, k, w, 2, 16, "score", *vis)
    router = reference.router_scores(q8, k, w, 16, causal, ks, ke, **scales)
    assert_valid_topk(heads, router, 2, rel_tol=2e-6)
    values, indices = cuda_ops.CUDA_IMPLEMENTATIONS["routed_topk"](q8, k, w, heads, 12, 1.0, *vis)
    routed = reference.routed_scores(q8, k, w, heads, 1.0, causal, ks, ke, **scales)
    _assert_selection_scores(values, indices, routed, 12)


@pytest.mark.skipif(not INTERPRETER, reason="CPU interpreter tests (the GPU has tests/gpu)")
def test_triton_rerank_and_hisa_with_fp8():
    q8, k8, w, q_scale, k_scale = _triton_site(5)
    vis = (True, None, None, None, 0, q_scale, k_scale)
    scales = dict(q_scale=q_scale, k_scale=k_scale)
    kept = cuda_ops.CUDA_IMPLEMENTATIONS["hisa_candidates"](q8, k8, w, 16, 3, *vis)
    want = torch_impl.hisa_candidates(q8, k8, w, 16, 3, *vis)
    assert head_sets(kept) == head_sets(want)
    values, indices = cuda_ops.CUDA_IMPLEMENTATIONS["rerank_topk"](q8, k8, w, kept, 12, 1.0, *vis)
    scores = reference.dense_scores(q8, k8, w, 1.0, True, **scales)
    _assert_selection_scores(values, indices, _restricted(scores, kept), 12)


@pytest.mark.skipif(not INTERPRETER, reason="CPU interpreter tests (the GPU has tests/gpu)")
def test_triton_pooled_keys_dequantize():
    _, k8, _, _, k_scale = _triton_site(6, keys=37)
    real = reference.dequantized(k8, k8, None, k_scale)[1]
    torch.testing.assert_close(pooled_keys(k8, 8, k_scale),
                               reference.pooled_keys(real, 8).float(), rtol=1e-6, atol=1e-6)
