"""Registration checks of every misa op: torch.library.opcheck (schema, autograd registration,
fake impl, AOT dispatch with static and dynamic shapes), and torch.compile(dynamic=True) calls
that must trace each op once for several shapes and return what eager returns."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

from misa_compile import MisaConfig, indexer_topk

ops = torch.ops.misa
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
                 "test_aot_dispatch_static", "test_aot_dispatch_dynamic")
VISIBILITY = ("causal", "ragged", "bool_mask", "additive_mask")
# (B, S, T) for the compile tests. No size equals another size of the same call (H=4, D=8, the 2
# routed heads, T-2 candidates): Dynamo's duck sizing would tie equal sizes together and the next
# shape would then recompile for a reason unrelated to the ops.
COMPILE_SHAPES = ((3, 5, 11), (5, 6, 13), (6, 7, 16))


def _inputs(batch, queries, keys, heads, dim, visibility, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, queries, heads, dim, generator=gen)
    k = torch.randn(batch, keys, dim, generator=gen)
    w = torch.randn(batch, queries, heads, generator=gen)
    kwargs = {"causal": visibility == "causal"}
    if visibility == "ragged":
        kwargs["key_start"] = torch.randint(0, keys // 2, (batch, queries), generator=gen)
        kwargs["key_end"] = torch.randint(keys // 2, keys + 1, (batch, queries), generator=gen)
    elif visibility == "bool_mask":
        kwargs["mask"] = torch.rand(batch, queries, keys, generator=gen) > 0.3
    elif visibility == "additive_mask":
        bias = torch.randn(batch, queries, keys, generator=gen)
        kwargs["mask"] = bias.masked_fill(bias < -1, float("-inf"))
    heads_idx = torch.rand(batch, queries, heads, generator=gen).argsort(-1)[..., :2]
    candidates = torch.rand(batch, queries, keys, generator=gen).argsort(-1)[..., :keys - 2]
    return (q, k, w), kwargs, heads_idx, candidates


def _calls(batch, queries, keys, visibility, seed=0):
    """(op name, op, positional args, keyword args) for every misa op on one small site."""
    (q, k, w), kwargs, heads, candidates = _inputs(batch, queries, keys, 4, 8, visibility, seed)
    return [
        ("dense_topk", ops.dense_topk, (q, k, w, 5), dict(kwargs, scale=0.5)),
        ("route_heads", ops.route_heads, (q, k, w, 2), dict(kwargs, block_size=3)),
        ("routed_topk", ops.routed_topk, (q, k, w, heads, 5), kwargs),
        ("rerank_topk", ops.rerank_topk, (q, k, w, candidates, 5), dict(kwargs, chunk=2)),
        ("hisa_candidates", ops.hisa_candidates, (q, k, w, 3, 2), kwargs),
    ]


OP_NAMES = [name for name, *_ in _calls(1, 2, 6, "causal")]


@pytest.mark.parametrize("visibility", VISIBILITY)
@pytest.mark.parametrize("op_name", OP_NAMES)
def test_opcheck(op_name, visibility):
    _, op, args, kwargs = next(c for c in _calls(2, 3, 11, visibility) if c[0] == op_name)
    results = torch.library.opcheck(op, args, kwargs, test_utils=OPCHECK_UTILS)
    assert results == {name: "SUCCESS" for name in OPCHECK_UTILS}


def _assert_same_outputs(compiled, eager):
    compiled = compiled if isinstance(compiled, tuple) else (compiled,)
    eager = eager if isinstance(eager, tuple) else (eager,)
    for got, want in zip(compiled, eager, strict=True):
        # The compiled graph runs the same implementation on the same inputs: results match
        # exactly, ties included.
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(got, want)


def _ops_in(counter):
    """Names of the misa ops called in the captured graphs (as packets or overloads)."""
    targets = {str(node.target) for graph in counter.graphs for node in graph.graph.nodes
               if node.op == "call_function"}
    return {target.split(".")[1] for target in targets if target.startswith("misa.")}


@pytest.mark.parametrize("visibility", VISIBILITY)
@pytest.mark.parametrize("op_name", OP_NAMES)
def test_compile_dynamic_matches_eager(op_name, visibility):
    """The first call traces with symbolic sizes; the next (B, S, T) must reuse that graph (a
    recompile would mean the fake impl specialised on a size) and match eager."""
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def call(op, args, kwargs):
        return op(*args, **kwargs)

    compiled = torch.compile(call, backend=counter, dynamic=True, fullgraph=True)
    for number, (batch, queries, keys) in enumerate(COMPILE_SHAPES):
        _, op, args, kwargs = next(c for c in _calls(batch, queries, keys, visibility)
                                   if c[0] == op_name)
        with torch.compiler.set_stance("fail_on_recompile" if number else "default"):
            got = compiled(op, args, kwargs)
        _assert_same_outputs(got, op(*args, **kwargs))
    assert _ops_in(counter) == {op_name}


@pytest.mark.parametrize("variant", ["dense", "misa", "misa_hier", "hisa"])
def test_inductor_dynamic_indexer_matches_eager(variant):
    """Every variant's op chain through Inductor with dynamic shapes, for two sizes."""
    config = MisaConfig(variant=variant, active_heads=2, block_size=3, candidates=6,
                        hisa_block=3, hisa_blocks=2)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")

    def site(q, k, w, key_start, key_end):
        return indexer_topk(q, k, w, 4, config, key_start=key_start, key_end=key_end)

    compiled = torch.compile(site, backend=counter, dynamic=True, fullgraph=True)
    for number, (batch, queries, keys) in enumerate(COMPILE_SHAPES[:2]):
        (q, k, w), kwargs, _, _ = _inputs(batch, queries, keys, 4, 8, "ragged")
        args = (q, k, w, kwargs["key_start"], kwargs["key_end"])
        with torch.compiler.set_stance("fail_on_recompile" if number else "default"):
            got = compiled(*args)
        _assert_same_outputs(got, site(*args))
    expected = {"dense": {"dense_topk"}, "misa": {"route_heads", "routed_topk"},
                "misa_hier": {"route_heads", "routed_topk", "rerank_topk"},
                "hisa": {"hisa_candidates", "rerank_topk"}}[variant]
    assert _ops_in(counter) == expected
