"""misa_compile.package_aoti and `misa export --aoti`: the rewritten program compiled by
AOTInductor on CPU, loaded with torch._inductor.aoti_load_package in a fresh process that never
imports misa_compile (tests/export/aoti_process.py asserts that, and that no misa op is
registered there), and compared with the Python path (program.module()).

Tolerances: the package runs Inductor's generated C++ for the whole model, which fuses and
reorders fp32 reductions (RMS norms, softmax, the index score sums) differently from ATen's eager
kernels, so logits differ in the last bits (about 2e-6 here). Selections are compared as sets up
to ties (assert_same_selection): a routed score that is exactly 0 for several keys (ReLU of every
routed head) may tie at the k-th place, and which tied key topk keeps is unspecified."""
from __future__ import annotations

import pytest
import torch

import misa_compile
from misa_compile import MisaConfig
from misa_compile.cli import main
from misa_compile.export import PackageError

from .aoti_process import run_package
from .factories import indexer_host
from .onnx_cases import assert_same_selection

FACTORY = "tests.export.factories:indexer_host"


def python_path(program: torch.export.ExportedProgram, *inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        return [leaf for leaf in torch.utils._pytree.tree_leaves(program.module()(*inputs))
                if isinstance(leaf, torch.Tensor)]


def assert_same_host_outputs(got: list[torch.Tensor], want: list[torch.Tensor],
                             keys: int) -> None:
    """The indexer host returns (an unrelated top-k's values, the indexer's values, indices)."""
    (unrelated, values, indices), (want_unrelated, want_values, want_indices) = got, want
    torch.testing.assert_close(unrelated, want_unrelated, rtol=1e-5, atol=1e-6)
    assert_same_selection(values, indices, want_values, want_indices, keys=keys, atol=1e-5)


@pytest.mark.slow
def test_tiny_deepseek_package_runs_without_misa_compile(tmp_path_factory):
    from misa_compile.models.deepseek_v32_tiny import tiny_deepseek_v32

    # batched_mm experts: the default grouped_mm calls a transformers custom op, which a package
    # could only run with transformers registering it (and the eager experts loop is
    # data-dependent, which torch.export cannot capture).
    model, input_ids = tiny_deepseek_v32(layers=2, index_heads=8, index_topk=8,
                                         sequence_length=16, experts_implementation="batched_mm")
    result = misa_compile.export(model, (input_ids,),
                                 config=MisaConfig("misa", active_heads=4, block_size=8))
    assert len(result.report.rewritten) == 2 and not result.report.refused, str(result.report)
    workdir = tmp_path_factory.mktemp("deepseek_aoti")
    package = workdir / "tiny_aoti.pt2"
    assert misa_compile.package_aoti(result, package) == str(package)
    # The package returns the model's output type, which pytree knows once its module is
    # imported; that is transformers, not misa_compile.
    (logits,) = run_package(package, (input_ids,), workdir,
                            imports="import transformers.modeling_outputs")
    (want,) = python_path(result.program, input_ids)
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_hisa_ops_run_in_the_package(tmp_path_factory):
    # hisa_candidates and rerank_topk; route_heads, routed_topk (dense_topk on the routed heads)
    # and rerank_topk run in the DeepSeek and command tests. 5 blocks of 4 keys, 2 kept: the
    # candidates really are a subset.
    model, inputs = indexer_host(heads=4, queries=6, keys=20)
    result = misa_compile.export(model, inputs,
                                 config=MisaConfig("hisa", hisa_block=4, hisa_blocks=2))
    assert [r.variant for r in result.report.rewritten] == ["hisa"], str(result.report)
    workdir = tmp_path_factory.mktemp("hisa_aoti")
    misa_compile.package_aoti(result.program, workdir / "host.pt2")
    got = run_package(workdir / "host.pt2", inputs, workdir)
    assert_same_host_outputs(got, python_path(result.program, *inputs), keys=20)


@pytest.mark.slow
def test_export_command_writes_an_aoti_package(tmp_path_factory, capsys):
    workdir = tmp_path_factory.mktemp("command_aoti")
    package, program_path = workdir / "host_aoti.pt2", workdir / "host.pt2"
    status = main(["export", FACTORY, "--factory-arg", "heads=4", "--variant", "misa_hier",
                   "--active-heads", "2", "--block-size", "4", "--candidates", "6",
                   "--out", str(program_path), "--aoti", str(package), "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0
    assert f"wrote {package}" in out and f"wrote {program_path}" in out
    _, inputs = indexer_host()
    got = run_package(package, inputs, workdir)
    assert_same_host_outputs(got, python_path(misa_compile.load(program_path), *inputs),
                             keys=inputs[1].shape[1])


def test_a_cpu_package_of_a_dynamic_program_is_refused_naming_the_site():
    model, inputs = indexer_host()
    auto = torch.export.Dim.AUTO
    result = misa_compile.export(model, inputs, config=MisaConfig("misa", active_heads=2,
                                                                  block_size=4),
                                 dynamic_shapes=tuple({0: auto, 1: auto} for _ in inputs))
    with pytest.raises(PackageError, match=r"has symbolic sizes .*export without dynamic"):
        misa_compile.package_aoti(result, "never_written.pt2")


def test_export_command_with_aoti_and_dynamic_exits_1_saying_why(tmp_path, capsys):
    package = tmp_path / "host_aoti.pt2"
    status = main(["export", FACTORY, "--active-heads", "2", "--block-size", "4", "--dynamic",
                   "--aoti", str(package), "--no-progress"])
    assert status == 1
    err = capsys.readouterr().err
    assert err.startswith("misa export: misa_compile.package_aoti: ") and "symbolic" in err
    assert not package.exists()


def test_package_aoti_takes_a_program_only():
    with pytest.raises(TypeError, match="must be a MisaExport or an ExportedProgram, got Linear"):
        misa_compile.package_aoti(torch.nn.Linear(2, 2), "never_written.pt2")


@pytest.mark.parametrize("router,opaque", [("score", False), ("qnorm", True)])
def test_a_cuda_call_the_kernels_do_not_cover_is_packaged_as_its_torch_implementation(
        router, opaque):
    """On CUDA a misa op with a FunctionalTensorMode rule traces into its Triton kernels only for
    the calls they cover; the rule keeps any other call (here the qnorm router) as the opaque op,
    which a package could not run, so package_aoti must replace it like a CPU op. Checked on a
    graph whose values are fake CUDA tensors (no GPU needed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from misa_compile.export import _opaque_misa_ops
    from misa_compile.kernels.triton import register  # noqa: F401  (the FunctionalTensorMode rules)

    graph = torch.fx.Graph()
    with FakeTensorMode():
        fakes = dict(q=torch.empty(1, 16, 4, 8, device="cuda"),
                     k=torch.empty(1, 16, 8, device="cuda"),
                     w=torch.empty(1, 16, 4, device="cuda"))
        inputs = []
        for name, fake in fakes.items():
            node = graph.placeholder(name)
            node.meta["val"] = fake
            inputs.append(node)
        heads = graph.call_function(torch.ops.misa.route_heads.default, (*inputs, 2, 4),
                                    {"router": router})
        heads.meta["val"] = torch.empty(1, 16, 2, dtype=torch.int64, device="cuda")
    graph.output(heads)
    found = _opaque_misa_ops(torch.fx.GraphModule(torch.nn.Module(), graph))
    assert found == ([torch.ops.misa.route_heads.default] if opaque else [])
