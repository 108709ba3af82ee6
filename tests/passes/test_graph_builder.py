"""GraphBuilder inside Inductor (for_inductor=True): the ops that Inductor only decomposes are
inserted as what they decompose to, with the same values, and an op Inductor could not lower on
this torch is refused with NotLowerable instead of failing the compile later."""
from __future__ import annotations

import pytest
import torch
from torch.fx import Graph, GraphModule

from misa_compile.passes.graph_builder import GraphBuilder, NotLowerable

aten, prims = torch.ops.aten, torch.ops.prims


def graph_with_input(example: torch.Tensor):
    graph = Graph()
    x = graph.placeholder("x")
    x.meta["val"] = example
    out = graph.output(None)
    return graph, x, out


def run(graph, out, result, example):
    out.args = (result,)
    return GraphModule(torch.nn.Module(), graph)(example)


@pytest.mark.parametrize("start,end,step", [(0, 7, 1), (6, -1, -1), (2, 11, 3), (5, 5, 1)])
def test_arange_becomes_iota_with_the_same_values(start, end, step):
    example = torch.zeros(3)
    graph, _, out = graph_with_input(example)
    builder = GraphBuilder(graph, out, for_inductor=True)
    node = builder.call(aten.arange.start_step, start, end, step, dtype=torch.int64,
                        device=torch.device("cpu"), pin_memory=False)
    assert node.target == prims.iota.default
    assert torch.equal(run(graph, out, node, example), torch.arange(start, end, step))


def test_to_copy_becomes_convert_element_type():
    example = torch.randn(4, 5) * 1000
    graph, x, out = graph_with_input(example)
    node = GraphBuilder(graph, out, for_inductor=True).call(aten._to_copy.default, x,
                                                            dtype=torch.bfloat16)
    assert node.target == prims.convert_element_type.default
    assert node.meta["val"].dtype == torch.bfloat16
    assert torch.equal(run(graph, out, node, example), example.to(torch.bfloat16))


def test_masked_fill_becomes_where_over_a_full():
    example = torch.randn(4, 5)
    graph, x, out = graph_with_input(example)
    builder = GraphBuilder(graph, out, for_inductor=True)
    hide = builder.call(aten.lt.Scalar, x, 0.0)
    node = builder.call(aten.masked_fill.Scalar, x, hide, float("-inf"))
    assert node.target == aten.where.self
    assert {n.target for n in graph.nodes} & {aten.masked_fill.Scalar} == set()
    assert torch.equal(run(graph, out, node, example), 
                       example.masked_fill(example < 0, float("-inf")))


def test_outside_inductor_the_ops_are_kept_as_written():
    example = torch.zeros(3)
    graph, _, out = graph_with_input(example)
    node = GraphBuilder(graph, out).call(aten.arange.start_step, 0, 3, 1, dtype=torch.int64,
                                         device=torch.device("cpu"), pin_memory=False)
    assert node.target == aten.arange.start_step


def test_an_op_inductor_only_decomposes_is_refused():
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.lowering import lowerings

    unlowered = [op for op in select_decomp_table()
                 if isinstance(op, torch._ops.OpOverload) and op not in lowerings]
    assert unlowered, "this torch's Inductor lowers every op it decomposes"
    example = torch.zeros(3)
    graph, x, out = graph_with_input(example)
    builder = GraphBuilder(graph, out, for_inductor=True)
    with pytest.raises(NotLowerable, match="no lowering"):
        builder.call(unlowered[0], x)
    assert len(graph.nodes) == 2, "nothing is inserted for a refused op"
