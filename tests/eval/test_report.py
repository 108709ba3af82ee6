"""The report folder: every number in report.md is the JSON's number, formatted; the terminal
tables come from the same document; `misa eval` writes the folder and refuses bad options with a
message naming the option."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest

from misa_compile import cli
from misa_compile.config import MisaConfig
from misa_compile.eval.capture import capture_indexer_sites
from misa_compile.eval.report import (fmt_ms, fmt_ratio, fmt_timing, terminal_tables,
                                      write_report)
from misa_compile.eval.runner import run_evaluation
from misa_compile.eval.settings import QUICK
from misa_compile.eval.workloads import structured_workload
from misa_compile.kernels import indexer_topk

TINY = dataclasses.replace(
    QUICK, lengths=(256, 512), active_heads=(2, 4, 16), index_heads=8, head_dim=16, queries=16,
    k_top=16, layers=2, block_size=32, candidates=64, hisa_block=8, hisa_blocks=4,
    needle_lengths=(256, 512), needle_depths=(0.0, 0.5, 1.0), needle_heads=4, repeats=3)
TINY_CLI = ["--lengths", "256", "512", "--index-heads", "8", "--head-dim", "16", "--queries", "16",
            "--k-top", "16", "--layers", "1", "--block-size", "32", "--candidates", "64",
            "--hisa-block", "8", "--hisa-blocks", "4", "--repeats", "0", "--no-progress"]


def markdown_table(markdown: str, heading: str) -> list[list[str]]:
    """The rows (cells as strings) of the first table after `heading`."""
    section = markdown.split(heading, 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # drop the header and the rule


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    report = run_evaluation(TINY, device="cpu")
    written = write_report(report, out)
    return out, report, written


def test_folder_has_markdown_json_and_png(report_dir):
    out, _, written = report_dir
    assert {p.name for p in out.iterdir()} == {"report.md", "report.json", "needle_heatmap.png"}
    assert set(written) == {"markdown", "json", "png"}


def test_markdown_numbers_are_the_json_numbers(report_dir):
    out, _, _ = report_dir
    data = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    labels = {v["label"]: v["key"] for v in data["variants"]}
    rows = data["synthetic"]["rows"]
    recall = markdown_table(markdown, "### Recall of the dense selection")
    iou = markdown_table(markdown, "### IoU with the dense selection")
    times = markdown_table(markdown, "### Time per indexer call")
    assert [r[0] for r in recall] == [v["label"] for v in data["variants"]]
    checked = 0
    for table in (recall, iou, times):
        assert len(table) == len(labels)
    for r_row, i_row, t_row in zip(recall, iou, times):
        key = labels[r_row[0]]
        for column, row in enumerate(rows, start=1):
            summary = row["summary"][key]
            assert r_row[column] == (f"{fmt_ratio(summary['recall'])} "
                                     f"({fmt_ratio(summary['recall_worst_layer'])})")
            assert i_row[column] == fmt_ratio(summary["iou"])
            assert t_row[column] == fmt_timing(summary)
            checked += 3
    per_layer = markdown_table(markdown, "### Recall per layer")
    for line in per_layer:
        key = labels[line[0]]
        expected = [fmt_ratio(layer[key]["recall"]) for row in rows for layer in row["layers"]]
        assert line[1:] == expected
        checked += len(expected)
    needle = markdown_table(markdown, "## Needle in a haystack")
    for line in needle:
        key = next(k for k, label in data["needle"]["labels"].items() if label == line[0])
        assert line[1] == fmt_ratio(data["needle"]["summary"][key])
        cells = [v for row in data["needle"]["grids"][key] for v in row]
        assert line[2] == f"{sum(v >= 1.0 for v in cells)}/{len(cells)}"
        checked += 2
    assert checked > 50


def test_summaries_are_the_means_of_the_layers(report_dir):
    _, report, _ = report_dir
    for row in report["synthetic"]["rows"]:
        for key, summary in row["summary"].items():
            recalls = [layer[key]["recall"] for layer in row["layers"]]
            assert summary["recall"] == pytest.approx(sum(recalls) / len(recalls))
            assert summary["recall_worst_layer"] == min(recalls)


def test_report_states_where_numbers_come_from_and_skipped_heads(report_dir):
    out, report, _ = report_dir
    markdown = (out / "report.md").read_text()
    assert "**Synthetic**" in markdown and "not a model" in markdown
    assert "**Captured**: none in this report" in markdown
    assert any("h = 16 skipped" in note for note in report["notes"])
    assert "misa_h16" not in {v["key"] for v in report["variants"]}
    # Dense is its own reference.
    for row in report["synthetic"]["rows"]:
        assert row["summary"]["dense"]["recall"] == 1.0


def test_terminal_tables_show_the_same_numbers(report_dir):
    _, report, _ = report_dir
    text = terminal_tables(report)
    # Recall / IoU table, time table, then the needle table.
    quality_line, time_line, _ = [l for l in text.splitlines() if l.startswith("MISA h=4 ")]
    summary = [report["synthetic"]["rows"][i]["summary"]["misa_h4"] for i in range(2)]
    assert re.findall(r"\d+\.\d+", quality_line) == [
        fmt_ratio(s[name]) for s in summary for name in ("recall", "iou")]
    assert re.findall(r"\d+\.\d+", time_line) == [
        fmt_ms(s[name]) for s in summary for name in ("ms_median", "ms_min", "ms_max")]
    assert "generated, not a model" in text and "needle in a haystack" in text


def test_cli_writes_the_report_folder(tmp_path, capsys):
    code = cli.main(["eval", "--quick", *TINY_CLI, "--heads", "4", "--variants", "misa", "hisa",
                     "--out", str(tmp_path / "r"), "--seed", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "MISA h=4" in printed and "HISA" in printed and "MISA-hier" not in printed
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["settings"]["seed"] == 3 and data["settings"]["lengths"] == [256, 512]
    assert [v["key"] for v in data["variants"]] == ["dense", "misa_h4", "hisa"]
    assert (tmp_path / "r" / "needle_heatmap.png").is_file()


def test_cli_evaluates_captured_tensors(tmp_path, capsys):
    wl = structured_workload(queries=24, keys=300, heads=8, dim=16, seed=9)
    with capture_indexer_sites() as capture:
        for _ in range(2):
            indexer_topk(wl.q, wl.k, wl.w, 16, MisaConfig(variant="dense"))
    capture.save(tmp_path / "sites.safetensors")
    code = cli.main(["eval", *TINY_CLI, "--heads", "4", "8", "--captured",
                     str(tmp_path / "sites.safetensors"), "--out", str(tmp_path / "r")])
    assert code == 0
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["synthetic"] is None and data["needle"] is None
    sites = data["captured"]["sites"]
    assert [s["site"] for s in sites] == ["site_000", "site_001"]
    assert all(s["results"]["misa_hier_h8"]["recall"] == 1.0 for s in sites)
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "**Captured** (tables under \"Captured\")" in markdown
    assert "captured tensors from" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "0"], "--lengths=0: must be >= 1"),
    (["--k-top", "-2"], "--k-top=-2: must be >= 1"),
    (["--repeats", "-1"], "--repeats=-1: must be >= 0"),
])
def test_cli_refuses_bad_numbers(tmp_path, capsys, argv, message):
    assert cli.main(["eval", *argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_unknown_variant(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--variants", "sparse"])
    assert "invalid choice: 'sparse'" in capsys.readouterr().err


def test_no_undefined_recall_footnote_while_k_top_is_below_every_length(report_dir):
    out, report, _ = report_dir
    assert "undefined" not in terminal_tables(report)
    assert "undefined" not in (out / "report.md").read_text()


@pytest.mark.parametrize("k_top", [255, 256, 600])
def test_footnote_explains_na_recall_where_k_top_reaches_t(tmp_path, k_top):
    settings = dataclasses.replace(TINY, k_top=k_top, layers=1, variants=("dense", "misa"),
                                   active_heads=(4,))
    report = run_evaluation(settings, device="cpu", needle=False)
    write_report(report, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    undefined_at = [t for t in TINY.lengths if k_top >= t]
    recall = markdown_table(markdown, "### Recall of the dense selection")
    assert [cell == "n/a (n/a)" for cell in recall[1][1:]] == [k_top >= t for t in TINY.lengths]
    recall_section = markdown.split("### Recall of the dense selection")[1].split("### IoU")[0]
    for rendered in (terminal_tables(report), recall_section):
        if not undefined_at:
            assert "undefined" not in rendered
            continue
        lengths = ", ".join(map(str, undefined_at))
        assert rendered.count(f"n/a: recall and IoU are undefined at T = {lengths}: "
                              f"k_top = {k_top} is at least the T keys a query can see") == 1
        assert "so every variant selects every visible key" in rendered


def test_footnote_names_captured_sites_whose_queries_all_see_at_most_k_top(tmp_path):
    short = structured_workload(queries=8, keys=40, heads=8, dim=16, seed=4)
    long = structured_workload(queries=8, keys=300, heads=8, dim=16, seed=5)
    with capture_indexer_sites() as capture:
        indexer_topk(short.q, short.k, short.w, 40, MisaConfig(variant="dense"))
        indexer_topk(long.q, long.k, long.w, 16, MisaConfig(variant="dense"))
    capture.save(tmp_path / "sites.safetensors")
    settings = dataclasses.replace(TINY, workload=None, active_heads=(4,))
    report = run_evaluation(settings, device="cpu", captured=tmp_path / "sites.safetensors")
    write_report(report, tmp_path / "r")
    markdown = (tmp_path / "r" / "report.md").read_text()
    note = "n/a: recall and IoU are undefined at site(s) site_000: no query there sees more"
    assert note in terminal_tables(report) and note in markdown
    assert "site_001" not in note
    per_site = markdown_table(markdown, "### Recall of the dense selection per site")
    assert per_site[0][6] == "n/a" and per_site[1][6] == "1.000"
