"""Eval timing: each variant gets an untimed warm-up call and then `repeats` timed calls per layer;
the JSON records every call and its median, min and max, the summaries pool the layers' calls,
and the tables print median (min-max)."""
from __future__ import annotations

import dataclasses
import json
import math
import statistics

import pytest

from misa_compile.eval import sweep
from misa_compile.eval.report import fmt_timing, terminal_tables, write_report
from misa_compile.eval.runner import run_evaluation
from misa_compile.eval.settings import FULL, QUICK
from misa_compile.eval.sweep import evaluate_layer, timing_summary
from misa_compile.eval.variants import variant_specs
from misa_compile.eval.workloads import structured_workload

SMALL = dataclasses.replace(
    QUICK, lengths=(128, 256), active_heads=(2,), variants=("dense", "misa"), index_heads=4,
    head_dim=8, queries=8, k_top=16, layers=2, block_size=16, candidates=32, hisa_block=8,
    hisa_blocks=4, repeats=3)


def test_timing_summary_median_resists_one_slow_call():
    timing = timing_summary([2.0, 90.0, 2.5, 2.2])
    assert timing == dict(ms_median=2.35, ms_min=2.0, ms_max=90.0, timed_calls=4)
    empty = timing_summary([])
    assert empty["timed_calls"] == 0 and math.isnan(empty["ms_median"])


def test_each_variant_gets_a_warm_up_and_then_the_timed_calls(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[4].variant)
        return real(*args, **kwargs)

    real = sweep.indexer_topk
    monkeypatch.setattr(sweep, "indexer_topk", counting)
    wl = structured_workload(queries=8, keys=128, heads=4, dim=8, seed=1)
    specs, _ = variant_specs(("dense", "misa"), (2,), 4, SMALL.base_config())
    results = evaluate_layer(wl.q, wl.k, wl.w, 16, specs, repeats=4)
    assert calls == ["dense"] * 5 + ["misa"] * 5       # 1 warm-up + 4 timed each
    for result in results.values():
        assert result["timed_calls"] == len(result["ms_calls"]) == 4
        assert result["ms_median"] == statistics.median(result["ms_calls"])


@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("timing")
    report = run_evaluation(SMALL, device="cpu", needle=False)
    write_report(report, out)
    return report, json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def test_json_records_median_min_max_of_the_timed_calls(small_report):
    _, data, _ = small_report
    checked = 0
    for row in data["synthetic"]["rows"]:
        for key, summary in row["summary"].items():
            pooled = [ms for layer in row["layers"] for ms in layer[key]["ms_calls"]]
            for layer in row["layers"]:
                result = layer[key]
                assert result["timed_calls"] == len(result["ms_calls"]) == SMALL.repeats
                assert result["ms_min"] <= result["ms_median"] <= result["ms_max"]
                assert result["ms_min"] == min(result["ms_calls"]) > 0
                assert result["ms_max"] == max(result["ms_calls"])
            assert summary["timed_calls"] == SMALL.layers * SMALL.repeats == len(pooled)
            assert summary["ms_min"] <= summary["ms_median"] <= summary["ms_max"]
            assert summary["ms_median"] == pytest.approx(statistics.median(pooled))
            assert (summary["ms_min"], summary["ms_max"]) == (min(pooled), max(pooled))
            checked += 1
    assert checked == 4


def test_tables_show_median_and_spread(small_report):
    report, _, markdown = small_report
    text = terminal_tables(report)
    summary = report["synthetic"]["rows"][1]["summary"]["misa_h2"]
    cell = fmt_timing(summary)
    assert cell.count("(") == 1 and cell.endswith(")")   # median (min-max)
    assert "median (min-max)" in text and cell in text
    assert "3 timed calls per layer or site after an untimed warm-up call" in text
    assert "### Time per indexer call, ms: median (min-max)" in markdown and cell in markdown


def test_first_call_alone_prints_only_the_median():
    report = run_evaluation(dataclasses.replace(SMALL, lengths=(128,), layers=1, repeats=0),
                            device="cpu", needle=False)
    summary = report["synthetic"]["rows"][0]["summary"]["dense"]
    assert summary["timed_calls"] == 1
    assert fmt_timing(summary) == f"{summary['ms_median']:.1f}"
    assert "warm-up included" in terminal_tables(report)


def test_presets_time_several_calls():
    assert QUICK.repeats * QUICK.layers >= 4 and FULL.repeats * FULL.layers >= 4
