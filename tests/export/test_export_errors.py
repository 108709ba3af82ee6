"""Bad input to the offline export gets an error that says what is wrong and what to do: a model
torch.export cannot capture, a site the ONNX translation cannot express, a saved program whose op
library (or output type) is missing at load time."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import misa_compile
from misa_compile import MisaConfig
from misa_compile.export import ExportError, LoadError
from misa_compile.onnx_export import UnsupportedOnnxSite

REPO = Path(__file__).resolve().parents[2]


class DataDependentIndexer(nn.Module):
    """Picks k from the data: torch.export cannot capture a Python branch on a tensor value."""

    def forward(self, q, k, w):
        scores = (torch.einsum("bshd,btd->bsht", q, k).relu() * w[..., None]).sum(2)
        k_top = 2 if scores.mean() > 0 else 3
        return scores.topk(k_top, dim=-1).indices


class HalfTheKeys(nn.Module):
    """A DSA indexer that keeps half of the keys: k_top = T // 2 is symbolic under dynamic T."""

    def forward(self, q, k, w):
        scores = (torch.einsum("bshd,btd->bsht", q, k).relu() * w[..., None]).sum(2)
        return scores.topk(scores.shape[-1] // 2, dim=-1).indices


def indexer_inputs(keys: int = 10):
    return torch.randn(1, 3, 4, 8), torch.randn(1, keys, 8), torch.randn(1, 3, 4)


def test_unexportable_model_names_the_model_and_chains_the_torch_error():
    with pytest.raises(ExportError) as caught:
        misa_compile.export(DataDependentIndexer(), indexer_inputs())
    message = str(caught.value)
    assert "torch.export could not capture DataDependentIndexer" in message
    assert "data-dependent" in message
    assert caught.value.__cause__ is not None


def test_export_rejects_a_config_that_is_not_a_misa_config():
    with pytest.raises(TypeError, match="config must be a MisaConfig, got dict"):
        misa_compile.export(HalfTheKeys(), indexer_inputs(), config={"variant": "misa"})


def test_symbolic_k_top_that_onnx_cannot_make_constant_is_refused():
    auto = torch.export.Dim.AUTO
    result = misa_compile.export(HalfTheKeys(), indexer_inputs(),
                                 config=MisaConfig("misa", active_heads=2, block_size=4),
                                 dynamic_shapes=(None, {1: auto}, None))
    (record,) = result.report.rewritten
    assert "//" in str(record.k_top)  # the program itself keeps the symbolic k_top
    with pytest.raises(UnsupportedOnnxSite) as caught:
        misa_compile.to_onnx(result)
    message = str(caught.value)
    assert "misa::routed_topk" in message and "symbolic k_top" in message
    assert "min(c, T)" in message


def run_python(code: str) -> subprocess.CompletedProcess:
    """A fresh interpreter at the repository root: only what `code` imports is registered."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def saved_indexer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("saved") / "indexer.pt2"
    result = misa_compile.export(HalfTheKeys(), indexer_inputs(),
                                 config=MisaConfig("misa", active_heads=2, block_size=4))
    result.save(path)
    return path


def test_plain_torch_load_without_misa_compile_fails_and_its_log_names_the_op(saved_indexer):
    done = run_python(f"""
        import torch
        torch.export.load({str(saved_indexer)!r})
    """)
    assert done.returncode != 0
    # torch's exception itself only says "error when deserializing"; its logged warning names
    # the op it could not resolve (what docs/export.md tells users).
    assert "RuntimeError: We ran into an error when deserializing" in done.stderr
    assert "torch.ops.misa." in done.stderr and "not registered" in done.stderr


def test_misa_compile_load_in_a_fresh_interpreter_registers_the_ops(saved_indexer):
    done = run_python(f"""
        import torch, misa_compile
        program = misa_compile.load({str(saved_indexer)!r})
        q, k, w = torch.randn(1, 3, 4, 8), torch.randn(1, 10, 8), torch.randn(1, 3, 4)
        print(tuple(program.module()(q, k, w).shape))
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(1, 3, 5)"


def test_load_names_ops_that_no_library_registered(tmp_path):
    # Saved where two more op libraries existed: a newer misa op and another project's op.
    path = tmp_path / "needs_more_ops.pt2"
    done = run_python(f"""
        import torch, misa_compile

        @torch.library.custom_op("misa::future_op", mutates_args=())
        def future_op(x: torch.Tensor) -> torch.Tensor:
            return x + 1

        @future_op.register_fake
        def _(x):
            return torch.empty_like(x)

        @torch.library.custom_op("thirdparty::scale", mutates_args=())
        def scale(x: torch.Tensor) -> torch.Tensor:
            return x * 2

        @scale.register_fake
        def _(x):
            return torch.empty_like(x)

        class Model(torch.nn.Module):
            def forward(self, x):
                return torch.ops.thirdparty.scale(torch.ops.misa.future_op(x))

        torch.export.save(torch.export.export(Model(), (torch.ones(3),)), {str(path)!r})
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    with pytest.raises(LoadError) as caught:
        misa_compile.load(path)
    message = str(caught.value)
    assert "misa::future_op.default" in message and "not provided by misa_compile" in message
    assert "thirdparty::scale.default" in message and "import the library" in message


def test_load_says_which_module_registers_an_output_type(tmp_path):
    path = tmp_path / "custom_output.pt2"
    module_dir = tmp_path / "types"
    module_dir.mkdir()
    (module_dir / "exportoutputs.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass
        import torch

        @dataclass
        class Selection:
            indices: torch.Tensor

        torch.export.register_dataclass(Selection,
                                        serialized_type_name="exportoutputs.Selection")
    """))
    done = run_python(f"""
        import sys, torch
        sys.path.insert(0, {str(module_dir)!r})
        from exportoutputs import Selection

        class Model(torch.nn.Module):
            def forward(self, x):
                return Selection(x.topk(2).indices)

        torch.export.save(torch.export.export(Model(), (torch.randn(2, 5),)), {str(path)!r})
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    with pytest.raises(LoadError, match=r"exportoutputs\.Selection .*import exportoutputs"):
        misa_compile.load(path)


def test_onnx_of_a_moe_model_with_grouped_mm_experts_names_the_batched_mm_fix():
    """The README's export snippet: the tiny model's MoE experts default to transformers'
    grouped_mm op, which has no ONNX translation; the error says how to switch them."""
    from misa_compile.models import tiny_deepseek_v32
    from misa_compile.onnx_export import OnnxExportError

    model, input_ids = tiny_deepseek_v32(layers=2, index_heads=4, index_topk=4,
                                         sequence_length=8)
    result = misa_compile.export(model, (input_ids,), config=MisaConfig(active_heads=2))
    with pytest.raises(OnnxExportError) as caught:
        misa_compile.to_onnx(result)
    message = str(caught.value)
    assert "grouped_mm" in message
    assert 'model.set_experts_implementation("batched_mm")' in message
    assert "--factory-arg experts_implementation=batched_mm" in message
