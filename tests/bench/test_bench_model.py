"""bench/bench_model.py: its --smoke run (tiny transformers indexers and a 1-layer
DeepseekV32ForCausalLM, on the CPU) produces every row, and the JSON says what
the benchmark promises: the dense rows select what eager and Inductor select, every compiled misa
row rewrote the indexer and ran the variant's ops, ratios and the whole-model figures are there.
A row that runs out of memory is recorded as OOM, not raised."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import bench_model  # noqa: E402

FAMILIES = ("DeepSeek-V3.2", "GLM-5 (GLM-MoE-DSA)")
VARIANT_OPS = {"dense": {"dense_topk"}, "misa": {"route_heads", "routed_topk"},
               "misa_hier": {"route_heads", "routed_topk", "rerank_topk"}}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_model") / "bench_model.json"
    # On the CPU even where a GPU is present: the assertions are about the benchmark, not a card.
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_model.py"), "--smoke",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def rows_of(result, family):
    return {row["row"]: row for row in result["rows"] if row["family"] == family}


@pytest.mark.slow
def test_header_names_the_card_and_versions(smoke):
    result, stdout = smoke
    assert result["card"]
    assert {"torch", "triton", "transformers", "python"} <= set(result["versions"])
    assert set(result["families"]) == set(FAMILIES)
    assert stdout.splitlines()[0].startswith("card: ")
    assert "| model | L | row | ms |" in stdout     # the table is printed last


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_row_runs(smoke, family):
    result, _ = smoke
    settings = bench_model.make_settings(smoke=True)
    rows = rows_of(result, family)
    expected = {"eager", "prologue", "inductor"} | {
        settings.row_name(kind, variant) for kind in ("misa", "chain") for variant in VARIANT_OPS}
    assert set(rows) == expected, sorted(rows)
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["ms"] > 0 and row["peak_gib"] >= 0


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_dense_rows_select_what_eager_and_inductor_select(smoke, family):
    result, _ = smoke
    rows = rows_of(result, family)
    assert {row.get("reference") for row in rows.values() if "recall" in row} == {"eager"}
    for name in ("inductor", "chain:dense", "misa:dense"):
        assert rows[name]["recall"] == 1.0, rows[name]
    for name in ("chain:dense", "misa:dense"):
        assert rows[name]["dense_vs"] == "inductor"
        assert rows[name]["dense_mismatching_queries"] == 0, rows[name]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_misa_rows_rewrite_the_site_and_run_the_variants_ops(smoke, family):
    result, _ = smoke
    settings = bench_model.make_settings(smoke=True)
    rows = rows_of(result, family)
    for variant, ops in VARIANT_OPS.items():
        compiled = rows[settings.row_name("misa", variant)]
        chain = rows[settings.row_name("chain", variant)]
        assert compiled["sites_rewritten"] == 1 and compiled["sites_refused"] == []
        assert compiled["site_masks"] == ["bool"]      # transformers' sdpa mask reaches the op
        for row in (compiled, chain):
            assert set(row["misa_ops"]) == ops, row["misa_ops"]
            assert all(sum(impls.values()) == 1 for impls in row["misa_ops"].values())
            assert 0.0 < row["recall"] <= 1.0
        assert compiled["vs_chain"] == pytest.approx(compiled["ms"] / chain["ms"])
        assert compiled["vs_inductor"] == pytest.approx(rows["inductor"]["ms"] / compiled["ms"])
    for name in ("eager", "inductor", "prologue"):
        assert rows[name]["misa_ops"] == {}


@pytest.mark.slow
def test_whole_model_rows(smoke):
    result, _ = smoke
    settings = bench_model.make_settings(smoke=True)
    rows = {row["row"]: row for row in result["model_rows"]}
    assert set(rows) == {"inductor", settings.row_name("misa", "misa")}
    misa = rows[settings.row_name("misa", "misa")]
    layers = misa["layers"]
    assert misa["status"] == rows["inductor"]["status"] == "ok"
    assert misa["sites_rewritten"] == layers
    assert {op: sum(impls.values()) for op, impls in misa["misa_ops"].items()} == {
        "route_heads": layers, "routed_topk": layers}
    assert misa["per_layer_ms"] == pytest.approx(misa["ms"] / layers)
    assert 0 < misa["indexer_share"]
    assert result["model_shrunk"]


def test_a_row_out_of_memory_is_recorded_not_raised():
    def run_out():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    def compiler_failure():
        try:
            run_out()
        except torch.cuda.OutOfMemoryError as error:
            raise RuntimeError("backend compiler failed") from error

    for fails in (run_out, compiler_failure):
        plan = bench_model.RowPlan("inductor", "", lambda f=fails: f, None)
        row, output = bench_model.measure_row(plan, torch.device("cpu"))
        assert row == {"status": "OOM"} and output is None


def test_other_failures_are_recorded_with_their_message():
    def broken():
        raise ValueError("no such head")

    row, _ = bench_model.measure_row(bench_model.RowPlan("x", "", lambda: broken, None),
                                     torch.device("cpu"))
    assert row["status"] == "error: ValueError: no such head"


def test_a_spent_budget_skips_the_rows_and_still_prints_and_writes_the_table(tmp_path):
    """--budget-s: rows not started in time are reported as skipped, not lost with the run."""
    out = tmp_path / "bench_model.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_model.py"), "--smoke",
                           "--budget-s", "0", "--model-lengths", "", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {row["family"] for row in rows} == set(FAMILIES)
    assert rows and all(row["status"] == bench_model.OUT_OF_TIME for row in rows)
    table = done.stdout[done.stdout.rindex("| model | L | row |"):]
    assert table.count(bench_model.OUT_OF_TIME) == len(rows)
