"""`misa tune` end to end on the tiny DeepSeek-V3.2 model: it writes tuned.json, the report, the
data and the plot; torch.compile and `misa export --config` take tuned.json as it is and run each
site with its chosen h; a captured file tunes the same way, addressing sites by position."""
from __future__ import annotations

import json

import pytest
import torch

import misa_compile
from misa_compile.cli import main
from misa_compile.eval.capture import capture_indexer_sites
from misa_compile.models import tiny_deepseek_v32

FACTORY = "misa_compile.models.deepseek_v32_tiny:tiny_deepseek_v32"
MODEL_ARGS = ["--factory-arg", "layers=2", "--factory-arg", "index_heads=8",
              "--factory-arg", "index_topk=8", "--factory-arg", "sequence_length=48",
              "--factory-arg", "experts_implementation=batched_mm"]
TUNE_ARGS = ["--block-size", "8", "--target-recall", "0.8"]


@pytest.fixture(scope="module")
def tuned_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune")
    assert main(["tune", FACTORY, *MODEL_ARGS, *TUNE_ARGS, "--out", str(out)]) == 0
    return out


def test_tune_writes_a_config_and_a_report_per_site(tuned_dir):
    options = json.loads((tuned_dir / "tuned.json").read_text())
    assert set(options["sites"]) == {"model.layers.0.self_attn.indexer",
                                     "model.layers.1.self_attn.indexer"}
    data = json.loads((tuned_dir / "tune.json").read_text())
    for site in data["sites"]:
        assert site["chosen"]["tune_recall"] >= 0.8
        assert site["held_out_queries"] > 0
    assert data["speedup"]["over_dense"] > 1.0
    assert "Expected speedup" in (tuned_dir / "tune.md").read_text()
    assert (tuned_dir / "tune.png").read_bytes()[:4] == b"\x89PNG"


def test_torch_compile_takes_tuned_json_as_options(tuned_dir):
    options = json.loads((tuned_dir / "tuned.json").read_text())
    chosen = [s["chosen"] for s in json.loads((tuned_dir / "tune.json").read_text())["sites"]]
    model, input_ids = tiny_deepseek_v32(layers=2, index_heads=8, index_topk=8,
                                         sequence_length=48)
    report = misa_compile.explain(model, input_ids, options=options)
    assert [(s.variant, s.active_heads) for s in report.rewritten] == [
        (c["variant"], c["active_heads"] if c["variant"] != "dense" else 8) for c in chosen]


def test_export_takes_tuned_json(tuned_dir, tmp_path, capsys):
    assert main(["export", FACTORY, *MODEL_ARGS, "--config", str(tuned_dir / "tuned.json"),
                 "--out", str(tmp_path / "m.pt2"), "--no-progress"]) == 0
    heads = [s["chosen"]["active_heads"] for s in
             json.loads((tuned_dir / "tune.json").read_text())["sites"]]
    printed = capsys.readouterr().out
    for layer, h in enumerate(heads):
        line = next(x for x in printed.splitlines() if x.startswith(f"model.layers.{layer}."))
        assert f" {h}/8 " in line


def test_export_refuses_a_config_naming_no_site(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"sites": {"model.layers.9.attn.indexer": {"active_heads": 2}}}))
    assert main(["export", FACTORY, *MODEL_ARGS, "--config", str(config), "--out",
                 str(tmp_path / "m.pt2"), "--no-progress"]) == 1
    assert "matches no indexer site" in capsys.readouterr().err
    assert not (tmp_path / "m.pt2").exists()


@pytest.mark.parametrize("content, message", [
    ("{", "not valid JSON"), ("[1]", "expected a JSON object"),
    ('{"speed": 2}', "unknown field(s) ['speed']"),
    ('{"sites": {"x": {"active_heads": 0}}}', "sites['x']")])
def test_export_names_a_bad_config_file(tmp_path, capsys, content, message):
    config = tmp_path / "c.json"
    config.write_text(content)
    assert main(["export", FACTORY, "--config", str(config), "--out",
                 str(tmp_path / "m.pt2")]) == 2
    assert message in capsys.readouterr().err


def test_tune_on_a_captured_file_addresses_sites_by_position(tmp_path):
    model, input_ids = tiny_deepseek_v32(layers=2, index_heads=8, index_topk=8,
                                         sequence_length=48)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="misa", options={"variant": "dense",
                                                             "target": "aot_eager"})
    with torch.no_grad(), capture_indexer_sites() as capture:
        compiled(input_ids)
    capture.save(tmp_path / "sites.safetensors")
    assert main(["tune", "--captured", str(tmp_path / "sites.safetensors"), *TUNE_ARGS,
                 "--out", str(tmp_path / "out")]) == 0
    options = json.loads((tmp_path / "out" / "tuned.json").read_text())
    assert set(options["sites"]) == {"0", "1"}


@pytest.mark.parametrize("arguments, message", [
    ([], "give MODULE:FACTORY or --captured FILE"),
    ([FACTORY, "--target-recall", "1.5"], "--target-recall=1.5"),
    ([FACTORY, "--metric", "p10", "--heads", "0"], "--heads"),
    (["--captured", "missing.safetensors"], "does not exist")])
def test_tune_refuses_bad_arguments(tmp_path, capsys, arguments, message):
    assert main(["tune", *arguments, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
