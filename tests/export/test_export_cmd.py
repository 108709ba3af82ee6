"""`misa export MODULE:FACTORY`: writes a loadable program and an ONNX model, prints the site
report, and turns bad command lines into one clear message and exit status 2."""
from __future__ import annotations

import onnx
import pytest
import torch

import misa_compile
from misa_compile.cli import main

from .factories import indexer_host
from .onnx_cases import OnnxRunner, assert_same_selection

FACTORY = "tests.export.factories:indexer_host"


def test_export_command_writes_program_and_onnx_and_prints_the_report(tmp_path, capsys):
    program_path, onnx_path = tmp_path / "host.pt2", tmp_path / "host.onnx"
    status = main(["export", FACTORY, "--factory-arg", "heads=4", "--active-heads", "4",
                   "--block-size", "4", "--dynamic", "--out", str(program_path),
                   "--onnx", str(onnx_path), "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0
    assert "1 indexer site(s): 1 rewritten, 0 refused" in out
    assert f"wrote {program_path}" in out and f"wrote {onnx_path}" in out
    assert "program inputs: x[" in out

    model, _ = indexer_host()
    _, other_inputs = indexer_host(queries=3, keys=13)  # another size: the axes are dynamic
    program = misa_compile.load(program_path)
    with torch.no_grad():
        unrelated, values, indices = program.module()(*other_inputs)
        eager_unrelated = model(*other_inputs)[0]
    torch.testing.assert_close(unrelated, eager_unrelated, rtol=1e-5, atol=1e-5)
    onnx_unrelated, onnx_values, onnx_indices = OnnxRunner(onnx.load(onnx_path))(*other_inputs)
    torch.testing.assert_close(onnx_unrelated, unrelated, rtol=1e-4, atol=1e-5)
    assert_same_selection(onnx_values, onnx_indices, values, indices, keys=13)


@pytest.mark.parametrize("arguments, message", [
    (["no-colon", "--out", "m.pt2"], "expected MODULE:FACTORY"),
    (["no_such_module_anywhere:make", "--out", "m.pt2"], "cannot import module"),
    (["tests.export.factories:missing", "--out", "m.pt2"], "has no function 'missing'"),
    ([FACTORY], "give --out FILE.pt2, --onnx FILE.onnx, --aoti FILE.pt2, or several"),
    ([FACTORY, "--out", "m.pt2", "--active-heads", "0"], "--active-heads=0: must be >= 1"),
    ([FACTORY, "--out", "m.pt2", "--factory-arg", "heads"], "expected NAME=VALUE"),
    (["tests.export.factories:model_without_inputs", "--out", "m.pt2"],
     "must return (model, example_args)"),
    ([FACTORY, "--onnx", "m.onnx", "--topk-limit", "0"], "--topk-limit=0: must be >= 1"),
])
def test_bad_command_lines_exit_2_with_one_clear_message(arguments, message, capsys):
    assert main(["export", *arguments]) == 2
    err = capsys.readouterr().err
    assert err.startswith("misa export: ") and message in err, err


def test_a_site_over_the_topk_limit_exits_1_naming_it(tmp_path, capsys):
    status = main(["export", FACTORY, "--active-heads", "2", "--block-size", "4",
                   "--onnx", str(tmp_path / "m.onnx"), "--topk-limit", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert status == 1
    assert "topk_limit=2" in err and "k=3" in err and "sites.0" in err
    assert not (tmp_path / "m.onnx").exists()
