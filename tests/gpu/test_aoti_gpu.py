"""An AOTInductor package of the rewritten tiny DeepSeek-V3.2 on CUDA: every misa op is lowered by
Inductor into the project's Triton kernels (no op is left for the torch-implementation fallback of
misa_compile.package_aoti), the package's generated code launches those kernels, and it runs in a
fresh process where neither misa_compile nor any misa op exists, with the Python path's logits."""
from __future__ import annotations

import zipfile

import pytest
import torch

import misa_compile
from misa_compile import MisaConfig
from misa_compile.export import _opaque_misa_ops
from misa_compile.kernels.triton.kernel_names import project_triton_kernel_names

from ..export.aoti_process import run_package

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

INDEX_HEADS = 8


def generated_code(package) -> str:
    """The text of every source file AOTInductor put in the package (wrapper and kernels)."""
    with zipfile.ZipFile(package) as archive:
        return "\n".join(archive.read(name).decode("utf-8", errors="replace")
                         for name in archive.namelist()
                         if name.endswith((".cpp", ".h", ".py", ".json")))


def crashes_loading_cuda_packages(workdir) -> bool:
    """Whether this machine's torch crashes loading every CUDA AOTInductor package: a plain
    nn.Linear, packaged and run in a fresh process, killed by a signal. torch 2.11 on the
    project's H100/H200 hosts does (a segmentation fault in aoti_load_package's _load_aoti), with
    or without misa ops; there a misa package cannot be run either."""
    x = torch.randn(4, 8, device="cuda")
    program = torch.export.export(torch.nn.Linear(8, 8).cuda(), (x,))
    package = workdir / "linear_probe.pt2"
    torch._inductor.aoti_compile_and_package(program, package_path=str(package))
    try:
        run_package(package, (x,), workdir)
    except AssertionError as error:
        return "exited with -" in str(error)
    return False


@pytest.fixture(scope="module")
def tiny_cuda_package(tmp_path_factory):
    """The rewritten tiny DeepSeek-V3.2 on CUDA, its AOTInductor package, and the folder."""
    from misa_compile.models.deepseek_v32_tiny import tiny_deepseek_v32

    # Dense MLPs in both layers: on torch 2.11 AOTInductor fails on CUDA to compile the MoE
    # gate of this model even with no misa op in the program (a dtype assertion on its
    # masked_fill), so the MoE layers would only test that.
    model, input_ids = tiny_deepseek_v32(layers=2, index_heads=INDEX_HEADS, index_topk=8,
                                         sequence_length=32, first_k_dense_replace=2)
    model, input_ids = model.cuda(), input_ids.cuda()
    # All heads routed: no key scores exactly 0 on every routed head, so no exact ties at the
    # k-th place whose order could differ between the package's and the Python path's kernels.
    result = misa_compile.export(model, (input_ids,),
                                 config=MisaConfig("misa", active_heads=INDEX_HEADS,
                                                   block_size=8))
    workdir = tmp_path_factory.mktemp("deepseek_cuda_aoti")
    package = workdir / "tiny_cuda_aoti.pt2"
    misa_compile.package_aoti(result, package)
    return result, input_ids, package, workdir


def test_tiny_deepseek_cuda_package_holds_the_triton_kernels(tiny_cuda_package):
    result, _, package, _ = tiny_cuda_package
    assert len(result.report.rewritten) == 2 and not result.report.refused, str(result.report)
    # Inductor traces every misa op into its Triton kernels (a FunctionalTensorMode
    # decomposition); none is replaced by its torch implementation.
    assert _opaque_misa_ops(result.program) == []
    code = generated_code(package)
    ours = sorted(name for name in project_triton_kernel_names() if name in code)
    assert ours, "the package holds none of misa_compile's Triton kernels"


def test_tiny_deepseek_cuda_package_runs_without_misa(tiny_cuda_package):
    result, input_ids, package, workdir = tiny_cuda_package
    if crashes_loading_cuda_packages(workdir):
        pytest.skip("this torch crashes loading any CUDA AOTInductor package (a plain "
                    "nn.Linear package segfaults in aoti_load_package), so the misa package "
                    "cannot be run here")
    # A call into a misa op left in the package would fail there: the child process has no misa
    # op registered (run_package asserts it) and must still run the package.
    (logits,) = run_package(package, (input_ids,), workdir,
                            imports="import transformers.modeling_outputs")
    with torch.no_grad():
        want = result.program.module()(input_ids).logits
    # Inductor's fused kernels reorder fp32 reductions (norms, softmax, score sums): last bits.
    torch.testing.assert_close(logits, want.cpu(), rtol=1e-4, atol=1e-5)
