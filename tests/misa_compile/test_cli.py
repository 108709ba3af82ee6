"""The `misa` command line checks its arguments before any work and reports every failure as one
line (exit 2 for a bad command line, 1 for a failed job), with the traceback only under --debug;
settings that did not apply fail the export unless --allow-refused."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import misa_compile
from misa_compile.cli import main
from misa_compile.commands.checks import UsageError
from misa_compile.unapplied import UnappliedSettingWarning

REPO = Path(__file__).resolve().parents[2]
FACTORY = "tests.export.factories:indexer_host"


def one_line_error(capsys, prefix: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(prefix) and "\n" not in err and "Traceback" not in err, err
    return err


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"misa {misa_compile.__version__}"


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "report folder (default: reports/eval)" in out
    assert "(default 2048, --quick 256)" in out


@pytest.mark.parametrize("arguments, message", [
    (["--out", "/nonexistent/x.pt2"], "--out /nonexistent/x.pt2: the folder /nonexistent does "
                                      "not exist"),
    (["--out", "x.onnx"], "--out x.onnx: --out writes a torch.export program (for ONNX use "
                          "--onnx), so the file name must end in .pt2"),
    (["--onnx", "x.pt2"], "--onnx x.pt2: --onnx writes an ONNX model, so the file name must end "
                          "in .onnx"),
    (["--onnx", "/dev/null/x.onnx"], "the folder /dev/null does not exist"),
    (["--out", "x.pt2", "--factory-arg", "head=4"],
     "--factory-arg head: tests.export.factories:indexer_host takes no such argument; it takes: "
     "heads, queries, keys"),
])
def test_export_refuses_bad_arguments_before_any_work(tmp_path, monkeypatch, capsys, arguments,
                                                      message):
    monkeypatch.chdir(tmp_path)
    assert main(["export", FACTORY, *arguments, "--no-progress"]) == 2
    assert message in one_line_error(capsys, "misa export: ")
    assert list(tmp_path.iterdir()) == []


def test_a_misspelt_tiny_model_argument_names_the_valid_ones(tmp_path, capsys):
    status = main(["export", "misa_compile.models.deepseek_v32_tiny:tiny_deepseek_v32",
                   "--factory-arg", "layer=4", "--out", str(tmp_path / "m.pt2"), "--no-progress"])
    assert status == 2
    err = one_line_error(capsys, "misa export: ")
    assert "unknown argument 'layer' (did you mean 'layers'?)" in err and "index_heads" in err


def test_python_factory_refuses_unknown_arguments():
    from misa_compile.models import tiny_deepseek_v32

    with pytest.raises(TypeError, match=r"unknown argument 'layer' \(did you mean 'layers'\?\); "
                                        r"valid: layers, index_heads"):
        tiny_deepseek_v32(layer=4)


def test_a_factory_that_raises_is_one_line(tmp_path, capsys):
    status = main(["export", "tests.export.factories:factory_that_raises",
                   "--out", str(tmp_path / "m.pt2"), "--no-progress"])
    assert status == 1
    err = one_line_error(capsys, "misa export: ")
    assert "factory_that_raises raised ValueError: size=3 is not supported" in err


def test_unapplied_setting_fails_the_export_unless_allowed(tmp_path, capsys):
    out = tmp_path / "m.pt2"
    arguments = ["export", FACTORY, "--active-heads", "99", "--out", str(out), "--no-progress"]
    assert main(arguments) == 1
    captured = capsys.readouterr()
    assert "1 refused" in captured.out
    assert "site" in captured.err and "refused (config_mismatch)" in captured.err
    assert "nothing was written" in captured.err and not out.exists()

    assert main(arguments + ["--allow-refused"]) == 0
    captured = capsys.readouterr()
    assert "misa export: warning:" in captured.err and out.exists()


def test_python_export_warns_when_a_setting_does_not_apply():
    from tests.export.factories import indexer_host

    model, inputs = indexer_host()
    with pytest.warns(UnappliedSettingWarning, match=r"config_mismatch.*\n.*no indexer was "
                                                     r"rewritten"):
        result = misa_compile.export(model, inputs,
                                     config=misa_compile.MisaConfig(active_heads=99))
    assert not result.report.rewritten


def test_python_export_of_a_model_without_an_indexer_warns():
    model = torch.nn.Linear(4, 4)
    with pytest.warns(UnappliedSettingWarning, match="no DSA indexer site was found"):
        misa_compile.export(model, (torch.randn(2, 4),))


@pytest.mark.parametrize("arguments, message", [
    (["--out", "/dev/null/x"], "--out /dev/null/x: cannot be created: /dev/null is not a folder"),
    (["--device", "tpu"], "--device tpu: unknown device; use cpu, cuda or cuda:N"),
    (["--captured", "missing.safetensors"], "--captured missing.safetensors: does not exist"),
    (["--k-top", "0"], "--k-top=0: must be >= 1"),
])
def test_eval_refuses_bad_arguments_before_any_work(tmp_path, monkeypatch, capsys, arguments,
                                                    message):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--quick", "--no-progress", *arguments]) == 2
    assert message in one_line_error(capsys, "misa eval: ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a usable GPU")
def test_eval_on_cuda_without_cuda_says_so(capsys):
    assert main(["eval", "--quick", "--device", "cuda", "--no-progress"]) == 2
    assert "--device cuda: CUDA is not available" in one_line_error(capsys, "misa eval: ")


def test_debug_shows_the_traceback():
    with pytest.raises(UsageError, match="--device tpu"):
        main(["eval", "--device", "tpu", "--debug"])
    with pytest.raises(UsageError, match="--device tpu"):
        main(["--debug", "eval", "--device", "tpu"])


def test_the_installed_command_prints_no_traceback():
    done = subprocess.run([sys.executable, "-m", "misa_compile.cli", "export", FACTORY,
                           "--out", "/nonexistent/x.pt2"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "misa export: --out /nonexistent/x.pt2: the folder /nonexistent does not exist"]
