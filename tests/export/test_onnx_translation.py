"""The standard-ONNX translation of every misa op, run in ONNX Runtime, against the torch ops.

Each visibility kind is exported once with dynamic batch, query, key and candidate axes;
hypothesis then draws the shapes it is run at, including key axes shorter than k_top, than the
misa_hier candidate count and than hisa_blocks key blocks. Selections are compared as sets of keys,
ties aside (see onnx_cases)."""
from __future__ import annotations

import functools

import onnx
import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import misa_compile
from misa_compile.kernels import reference
from misa_compile.onnx_export import (TENSORRT_TOPK_LIMIT, UnsupportedOnnxSite,
                                      check_onnx_sites)

from .onnx_cases import (HEADS, K_TOP, ROUTER_BLOCK, VARIANTS, VISIBILITY_KINDS, AllOps,
                         OnnxRunner, assert_same_heads, assert_same_hisa_candidates,
                         assert_same_selection, dynamic_shapes, hisa_block_scores, make_inputs,
                         ops_program, unflatten, visibility_kwargs, visible_sizes)

# No shrinking: each example runs the whole AllOps model twice, and a failure already prints
# its (small) shapes and seed.
SHAPE_SETTINGS = settings(max_examples=6, deadline=None, derandomize=True, database=None,
                          phases=(Phase.explicit, Phase.generate))
SHAPES = dict(batch=st.integers(1, 2), queries=st.integers(1, 4), keys=st.integers(1, 14),
              seed=st.integers(0, 2 ** 16))


@functools.lru_cache(maxsize=None)
def dynamic_runner(kind: str) -> OnnxRunner:
    example = make_inputs(kind, batch=2, queries=3, keys=12, seed=0)
    program = ops_program(kind, example, dynamic=True)
    model = misa_compile.to_onnx(program, dynamic_shapes=dynamic_shapes(kind),
                                 topk_limit=TENSORRT_TOPK_LIMIT)
    return OnnxRunner(model)


def run_both(runner: OnnxRunner, kind: str, inputs: tuple):
    got = unflatten(runner(*inputs))
    want = {name: tuple(out) for name, out in AllOps(kind)(*inputs).items()}
    return got, want


def assert_ops_match(runner: OnnxRunner, kind: str, inputs: tuple) -> None:
    """Each op on its own, on signed data: ties are frequent, so compare up to ties."""
    got, want = run_both(runner, kind, inputs)
    q, k, w = inputs[:3]
    keys = k.shape[1]
    vis = visibility_kwargs(kind, inputs[5:])
    for name in ("dense_topk", "routed_topk", "rerank_topk"):
        assert_same_selection(*got[name], *want[name], keys=keys, label=f"{kind}/{name}")
    router = reference.router_scores(q, k, w, ROUTER_BLOCK, **vis)
    assert_same_heads(got["route_heads"][0], want["route_heads"][0], router, f"{kind}/router")
    qnorm = q.double().norm(dim=-1)
    assert_same_heads(got["route_heads_qnorm"][0], want["route_heads_qnorm"][0], qnorm,
                      f"{kind}/qnorm router")
    assert_same_hisa_candidates(got["hisa_candidates"][0], want["hisa_candidates"][0],
                                hisa_block_scores(q, k, w, **vis), keys, f"{kind}/hisa")


def assert_variants_match(runner: OnnxRunner, kind: str, inputs: tuple) -> None:
    """Every variant end to end, on tie-free (positive) data."""
    got, want = run_both(runner, kind, inputs)
    for name in VARIANTS:
        assert_same_selection(*got[name], *want[name], keys=inputs[1].shape[1],
                              label=f"{kind}/{name}")


@pytest.mark.parametrize("kind", VISIBILITY_KINDS)
@SHAPE_SETTINGS
@given(**SHAPES)
def test_each_op_in_onnx_selects_what_the_torch_op_selects(kind, batch, queries, keys, seed):
    inputs = make_inputs(kind, batch, *visible_sizes(kind, queries, keys), seed)
    assert_ops_match(dynamic_runner(kind), kind, inputs)


@pytest.mark.parametrize("kind", VISIBILITY_KINDS)
@SHAPE_SETTINGS
@given(**SHAPES)
def test_every_variant_in_onnx_selects_what_the_torch_ops_select(kind, batch, queries, keys,
                                                                  seed):
    inputs = make_inputs(kind, batch, *visible_sizes(kind, queries, keys), seed, positive=True)
    assert_variants_match(dynamic_runner(kind), kind, inputs)


@SHAPE_SETTINGS
@given(queries=st.integers(1, 4), keys=st.integers(K_TOP, 14), seed=st.integers(0, 2 ** 16))
def test_all_heads_recover_the_dense_selection_in_onnx(queries, keys, seed):
    # With h = H the routed indexer is the dense one: recall against dense is exactly 1.
    inputs = make_inputs("causal", 2, queries, keys, seed, positive=True)
    outputs = unflatten(dynamic_runner("causal")(*inputs))
    dense_values, dense_indices = outputs["dense"]
    routed_values, routed_indices = outputs["misa_all_heads"]
    recall = reference.selection_recall(routed_indices, routed_values, dense_indices,
                                        dense_values)
    assert torch.equal(recall, torch.ones_like(recall))


def test_static_onnx_with_fewer_keys_than_k_top():
    # T=5 < k_top=6 < candidates=8, and HISA's 2 kept blocks of 4 reach past the last key.
    example = make_inputs("ragged", batch=2, queries=3, keys=5, seed=3)
    runner = OnnxRunner(misa_compile.to_onnx(ops_program("ragged", example, dynamic=False)))
    assert_ops_match(runner, "ragged", example)
    assert_variants_match(runner, "ragged",
                          make_inputs("ragged", batch=2, queries=3, keys=5, seed=3,
                                      positive=True))


def test_dynamic_onnx_names_its_axes_and_keeps_topk_constant():
    model = misa_compile.to_onnx(
        ops_program("causal", make_inputs("causal", 2, 3, 12, seed=0), dynamic=True),
        dynamic_shapes=dynamic_shapes("causal"))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input}
    assert dims["q"] == ["batch", "queries", HEADS, 8]
    assert dims["k"] == ["batch", "keys", 8]
    initializers = {init.name for init in model.graph.initializer}
    topks = [node for node in model.graph.node if node.op_type == "TopK"]
    assert len(topks) >= 8
    for node in topks:  # TensorRT's ONNX parser needs TopK's K to be an initializer
        assert node.input[1] in initializers, node


def test_custom_domain_nodes_are_registered_and_checked():
    example = make_inputs("ragged", batch=2, queries=3, keys=12, seed=0)
    model = misa_compile.to_onnx(ops_program("ragged", example, dynamic=True),
                                 dynamic_shapes=dynamic_shapes("ragged"), custom_domain=True)
    onnx.checker.check_model(model, full_check=True)  # the misa schemas are registered
    assert {entry.domain: entry.version for entry in model.opset_import}["misa"] == 1
    misa_nodes = [node for node in model.graph.node if node.domain == "misa"]
    assert {node.op_type for node in misa_nodes} == {
        "DenseTopK", "RouteHeads", "RoutedTopK", "RerankTopK", "HisaCandidates"}
    assert not any(node.op_type == "TopK" for node in model.graph.node)
    routers = [n for n in misa_nodes if n.op_type == "RouteHeads"]
    attributes = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                  for n in routers]
    # Identical calls are merged by the exporter's common-subexpression pass.
    assert {(a["active_heads"], a["router"]) for a in attributes} == {
        (2, b"score"), (2, b"qnorm"), (HEADS, b"score")}
    # The ragged range travels as the optional key_start/key_end inputs; no mask is given.
    assert all(n.input[3] and n.input[4] and (len(n.input) < 6 or not n.input[5])
               for n in routers)


def test_topk_limit_refuses_a_site_naming_it_and_the_rule():
    example = make_inputs("causal", batch=1, queries=2, keys=12, seed=0)
    program = ops_program("causal", example, dynamic=False,
                          variants={"misa_hier": VARIANTS["misa_hier"]})
    with pytest.raises(UnsupportedOnnxSite) as caught:
        misa_compile.to_onnx(program, topk_limit=7)
    message = str(caught.value)
    assert "routed_topk" in message and "k=8" in message and "topk_limit=7" in message
    assert "MisaConfig.candidates" in message
    check_onnx_sites(program, topk_limit=8)  # exactly at the limit is allowed


def test_to_onnx_rejects_bad_arguments():
    with pytest.raises(ValueError, match="topk_limit=0"):
        misa_compile.to_onnx(torch.nn.Identity(), (torch.ones(1),), topk_limit=0)
    with pytest.raises(TypeError, match="model_or_program must be"):
        misa_compile.to_onnx("model.pt2")
