"""misa_compile.export: export, rewrite, save, load, run. On generated indexer hosts (the zoo of
tests/passes: several DSA spellings planted beside unrelated top-ks and near-misses) with static
and dynamic shapes, and on the Hugging Face DeepSeek-V3.2 tiny model, also through ONNX Runtime.

With active_heads = H the rewritten program must compute what the original model computes
(selections up to ties, via the float64 references), and a loaded program exactly what the
in-memory one computes."""
from __future__ import annotations

import onnxruntime
import pytest
import torch

import misa_compile
from misa_compile import MisaConfig
from misa_compile.export import MisaExport

from ..passes.indexer_zoo import HostSpec, IndexerSpec, build_host, make_inputs
from ..passes.test_spellings import check_host, check_report
from .onnx_cases import assert_same_selection

# Indexer hosts built by the zoo: several spellings (einsum / matmul / per-head bmm, head sums by
# mul+sum or matmul, positive scales in different places, additive / bool / in-graph causal masks,
# batch and packed layouts, values and indices outputs) beside unrelated top-ks, and a near-miss
# that must stay untouched.
HOSTS = {
    "batch": HostSpec(sites=(
        IndexerSpec(qk="matmul", head_sum="matmul_weights", scale="hf", mask="additive_inf",
                    outputs="both", k_top=3),
        IndexerSpec(qk="bmm_heads", scale="before_relu", dtype="bf16_upcast", mask="tril",
                    k_top=4),
        IndexerSpec(mask="bool_masked_fill", k_top=5, negative="gelu"))),
    "packed": HostSpec(sites=(
        IndexerSpec(layout="flat", head_sum="einsum", scale="after_relu", mask="bool_where",
                    outputs="values", k_top=3),), layout="flat"),
}


def all_heads(heads: int) -> MisaConfig:
    return MisaConfig("misa", active_heads=heads, block_size=4)


def run(program: torch.export.ExportedProgram, *inputs):
    with torch.no_grad():
        return program.module()(*inputs)


def assert_identical(got, want) -> None:
    got, want = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def save_and_load(result: MisaExport, tmp_path) -> torch.export.ExportedProgram:
    path = tmp_path / "model.pt2"
    result.save(path)
    return misa_compile.load(path)


@pytest.mark.parametrize("name", HOSTS)
def test_indexer_hosts_round_trip_with_static_shapes(name, tmp_path):
    host = HOSTS[name]
    model, inputs = build_host(host), make_inputs(host, queries=6, keys=10)
    heads = host.sites[0].heads
    result = misa_compile.export(model, inputs, config=all_heads(heads))
    check_report(result.report, host)
    loaded = save_and_load(result, tmp_path)
    outputs = run(loaded, *inputs)
    assert_identical(outputs, run(result.program, *inputs))
    with torch.no_grad():
        check_host(model, host, inputs, outputs, model(*inputs))


@pytest.mark.parametrize("name", HOSTS)
def test_indexer_hosts_round_trip_with_dynamic_shapes(name, tmp_path):
    host = HOSTS[name]
    model = build_host(host)
    inputs = make_inputs(host, queries=6, keys=10)
    auto = torch.export.Dim.AUTO
    dynamic = tuple({axis: auto for axis in range(t.dim())} for t in inputs)
    result = misa_compile.export(model, inputs, config=all_heads(host.sites[0].heads),
                                 dynamic_shapes=dynamic)
    check_report(result.report, host)
    loaded = save_and_load(result, tmp_path)
    other = make_inputs(host, queries=3, keys=13, seed=1)  # another query and key count
    outputs = run(loaded, *other)
    assert_identical(outputs, run(result.program, *other))
    with torch.no_grad():
        check_host(model, host, other, outputs, model(*other))


def test_plain_torch_export_load_works_once_misa_compile_is_imported(tmp_path):
    q, k, w = torch.randn(1, 3, 4, 8), torch.randn(1, 9, 8), torch.randn(1, 3, 4)

    class Indexer(torch.nn.Module):
        def forward(self, q, k, w):
            scores = (torch.einsum("bshd,btd->bsht", q, k).relu() * w[..., None]).sum(2)
            return scores.topk(4, dim=-1).indices

    result = misa_compile.export(Indexer(), (q, k, w), config=all_heads(4))
    assert len(result.report.rewritten) == 1, str(result.report)
    torch.export.save(result.program, tmp_path / "indexer.pt2")
    loaded = torch.export.load(tmp_path / "indexer.pt2")
    assert any(getattr(n.target, "namespace", None) == "misa" for n in loaded.graph.nodes)
    assert_identical(run(loaded, q, k, w), run(result.program, q, k, w))


def test_to_onnx_of_a_module_rewrites_it_and_writes_the_file(tmp_path):
    class Indexer(torch.nn.Module):
        def forward(self, q, k, w):
            scores = (torch.einsum("bshd,btd->bsht", q, k).relu() * w[..., None]).sum(2)
            return scores.topk(4, dim=-1)

    q, k, w = torch.rand(2, 3, 4, 8), torch.rand(2, 9, 8), torch.randn(2, 3, 4)  # q.k > 0: no ties
    path = tmp_path / "indexer.onnx"
    model_proto = misa_compile.to_onnx(Indexer(), (q, k, w), path, config=all_heads(4))
    assert path.exists()
    assert {"TopK", "GatherElements"} <= {node.op_type for node in model_proto.graph.node}
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    values, indices = session.run(None, {"q": q.numpy(), "k": k.numpy(), "w": w.numpy()})
    want_values, want_indices = Indexer()(q, k, w)
    assert_same_selection(torch.from_numpy(values), torch.from_numpy(indices), want_values,
                          want_indices, keys=9)


# ---------------------------------------------------------------------------------------------
# Hugging Face DeepSeek-V3.2, tiny: every layer has an indexer (index_topk=8 of up to 24 keys)

LAYERS, INDEX_HEADS, INDEX_TOPK = 2, 8, 8
# The model asserts at least index_topk tokens once exported; both lengths differ from the
# example's 16.
LENGTHS = (12, 24)


@pytest.fixture(scope="module")
def deepseek():
    from misa_compile.models.deepseek_v32_tiny import tiny_deepseek_v32

    # batched_mm experts: the default grouped_mm is a transformers custom op without an ONNX
    # translation, and the eager experts loop is data-dependent (not exportable).
    model, input_ids = tiny_deepseek_v32(layers=LAYERS, index_heads=INDEX_HEADS,
                                         index_topk=INDEX_TOPK, sequence_length=16,
                                         experts_implementation="batched_mm")
    auto = torch.export.Dim.AUTO
    result = misa_compile.export(model, (input_ids,), config=all_heads(INDEX_HEADS),
                                 dynamic_shapes=({1: auto},))
    return model, result


def token_ids(length: int) -> torch.Tensor:
    return torch.randint(0, 96, (1, length), generator=torch.Generator().manual_seed(length))


def test_deepseek_indexers_are_rewritten_and_the_program_round_trips(deepseek, tmp_path):
    model, result = deepseek
    assert len(result.report.rewritten) == LAYERS and not result.report.refused, \
        str(result.report)
    assert all(r.heads == INDEX_HEADS for r in result.report.rewritten)
    loaded = save_and_load(result, tmp_path)
    for length in LENGTHS:
        ids = token_ids(length)
        logits = run(loaded, ids).logits
        assert torch.equal(logits, run(result.program, ids).logits)
        with torch.no_grad():  # all heads: the rewritten model is the original one
            torch.testing.assert_close(logits, model(ids).logits, rtol=1e-4, atol=1e-5)


def test_deepseek_onnx_runs_in_onnx_runtime_at_other_lengths(deepseek, tmp_path):
    _, result = deepseek
    path = tmp_path / "deepseek.onnx"
    model_proto = misa_compile.to_onnx(result, path=path)
    assert path.stat().st_size > 0
    assert not [n for n in model_proto.graph.node if n.domain == "misa"]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    for length in LENGTHS:
        ids = token_ids(length)
        (logits, *_) = session.run(None, {name: ids.numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), run(result.program, ids).logits,
                                   rtol=1e-4, atol=1e-4)
