"""The evaluation report: one JSON document holds every number; the Markdown file, the terminal
tables and the needle PNG are rendered from it, so they cannot disagree with it."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from .sweep import summarise_layers

NEEDLE_PNG = "needle_heatmap.png"
SYNTHETIC_SOURCE = ("generated {workload} synthetic workloads (misa_compile.eval.workloads), not "
                    "a model: they show how the variants behave on data with that structure and "
                    "do not predict a particular model's numbers")


def fmt_ratio(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def fmt_ms(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.1f}"


def fmt_timing(timing: dict) -> str:
    """"median (min-max)" of a result's timed calls; the median alone when there is one call."""
    if not timing["timed_calls"]:
        return "n/a"
    median = fmt_ms(timing["ms_median"])
    if timing["timed_calls"] == 1:
        return median
    return f"{median} ({fmt_ms(timing['ms_min'])}-{fmt_ms(timing['ms_max'])})"


def timing_method(settings: dict) -> str:
    """How the times were taken, for the captions of the time tables."""
    repeats = settings["repeats"]
    if repeats == 0:
        return "the first call of each layer or site, warm-up included, so an upper bound"
    return (f"{repeats} timed call{'s' if repeats > 1 else ''} per layer or site after an "
            "untimed warm-up call")


# Recall and IoU are means over the queries that see more than k_top keys; where there are none,
# every variant selects every visible key, and the tables say so instead of a bare n/a.
UNDEFINED_RECALL = ("n/a: recall and IoU are undefined at {where}: {why}, so every variant "
                    "selects every visible key and there is nothing to compare ({remedy})")


def synthetic_undefined_note(report: dict) -> Optional[str]:
    """The n/a footnote of the synthetic tables, naming the lengths T <= k_top."""
    k_top = report["settings"]["k_top"]
    lengths = [str(row["keys"]) for row in report["synthetic"]["rows"]
               if all(layer["dense"]["queries"] == 0 for layer in row["layers"])]
    if not lengths:
        return None
    return UNDEFINED_RECALL.format(
        where=f"T = {', '.join(lengths)}",
        why=f"k_top = {k_top} is at least the T keys a query can see",
        remedy="a --k-top below T or longer --lengths give numbers")


def captured_undefined_note(report: dict) -> Optional[str]:
    """The n/a footnote of the captured tables, naming the sites whose queries all see at most
    the site's k_top keys (a prompt shorter than the model's k_top)."""
    sites = [site["site"] for site in report["captured"]["sites"]
             if site["results"]["dense"]["queries"] == 0]
    if not sites:
        return None
    return UNDEFINED_RECALL.format(
        where=f"site(s) {', '.join(sites)}", why="no query there sees more than k_top keys",
        remedy="capture a prompt longer than k_top")


def length_label(keys: int) -> str:
    return f"{keys // 1024}K" if keys % 1024 == 0 else str(keys)


def build_report(*, settings: dict, environment: dict, variants: list, notes: list,
                 synthetic: Optional[list] = None, captured: Optional[dict] = None,
                 needle: Optional[dict] = None) -> dict:
    """Assembles the JSON document; adds the per-length and per-variant summaries."""
    report = dict(tool="misa eval", environment=environment, settings=settings,
                  variants=variants, notes=list(notes), synthetic=None, captured=None,
                  needle=None)
    keys = [v["key"] for v in variants]
    if synthetic is not None:
        rows = [dict(row, summary={key: summarise_layers(row["layers"], key) for key in keys})
                for row in synthetic]
        report["synthetic"] = dict(workload=settings["workload"], rows=rows,
                                   source=SYNTHETIC_SOURCE.format(workload=settings["workload"]))
    if captured is not None:
        sites = captured["sites"]
        summary = {key: summarise_layers([s["results"] for s in sites], key) for key in keys}
        report["captured"] = dict(captured, summary=summary)
    if needle is not None:
        summary = {key: _mean([v for row in grid for v in row])
                   for key, grid in needle["grids"].items()}
        report["needle"] = dict(needle, summary=summary,
                                source=SYNTHETIC_SOURCE.format(workload="structured"))
    return report


def write_report(report: dict, out_dir: str | Path) -> dict:
    """Writes report.json, report.md and (when there is a needle grid and Pillow is installed)
    the needle PNG into out_dir. Returns {name: path} of what was written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    if report["needle"] is not None:
        png = _write_needle_png(report, out / NEEDLE_PNG)
        report["needle"]["png"] = png.name if png else None
        if png:
            written["png"] = png
    written["json"] = out / "report.json"
    written["json"].write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")
    written["markdown"] = out / "report.md"
    written["markdown"].write_text(markdown(report))
    return written


def _write_needle_png(report: dict, path: Path) -> Optional[Path]:
    try:
        import PIL  # noqa: F401
    except ImportError:
        report["notes"].append("needle heatmap PNG not drawn: Pillow is not installed")
        return None
    from .heatmap_png import save_heatmap

    needle, settings = report["needle"], report["settings"]
    # Image rows are depths (0% at the top), columns context lengths, as in the usual NIAH plot.
    panels = [(needle["labels"][key], [list(col) for col in zip(*grid)])
              for key, grid in needle["grids"].items()]
    return save_heatmap(
        path, panels, row_labels=[f"{round(d * 100)}%" for d in needle["depths"]],
        col_labels=[length_label(n) for n in needle["lengths"]],
        title=(f"Needle retrieval, structured synthetic workload (H={settings['index_heads']}, "
               f"D={settings['head_dim']}, k_top={settings['k_top']})"),
        x_title="context length (keys)", y_title="needle depth")


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = ["# misa eval report", "", "## Where the numbers come from", ""]
    if report["synthetic"] is not None or report["needle"] is not None:
        lines.append(f"- **Synthetic** (recall tables under \"Synthetic\" and the needle heatmap): "
                     f"{SYNTHETIC_SOURCE.format(workload=s['workload'] or 'structured')}.")
    if report["captured"] is not None:
        lines.append(f"- **Captured** (tables under \"Captured\"): indexer inputs recorded from a "
                     f"real model run, file `{report['captured']['file']}`; every variant is "
                     "re-run offline on those exact tensors.")
    else:
        lines.append("- **Captured**: none in this report (run `misa eval --captured FILE` on "
                     "tensors recorded with `misa_compile.eval.capture_indexer_sites`).")
    env = report["environment"]
    lines += ["", f"Device: {env['device']}; torch {env['torch']}; seed {s['seed']}.",
              "Recall = |S' ∩ S| / |S| against the dense selection S, IoU = |S' ∩ S| / "
              "|S' ∪ S|, both over visible keys and averaged over the queries that see more "
              "than k_top keys; time = ms of one call of the whole indexer, median (min-max) "
              f"of {timing_method(s)}.", ""]
    lines += _synthetic_markdown(report) + _captured_markdown(report) + _needle_markdown(report)
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {note}" for note in report["notes"]] + [""]
    return "\n".join(lines)


def _synthetic_markdown(report: dict) -> list[str]:
    synthetic = report["synthetic"]
    if synthetic is None:
        return []
    s = report["settings"]
    rows = synthetic["rows"]
    header = "| variant | " + " | ".join(f"T={r['keys']}" for r in rows) + " |"
    rule = "|---|" + "---:|" * len(rows)
    lines = [f"## Synthetic: {synthetic['workload']} workload", "",
             f"H={s['index_heads']} heads, D={s['head_dim']}, the last {s['queries']} queries of "
             f"a context of T keys, k_top={s['k_top']}, {s['layers']} layer(s) (independent "
             f"seeds) per length, {s['dtype']}; router block {s['block_size']}, MISA-hier "
             f"candidates {s['candidates']}, HISA {s['hisa_blocks']} blocks of {s['hisa_block']}.",
             "", "### Recall of the dense selection (mean over layers; worst layer in brackets)",
             "", header, rule]
    for v in report["variants"]:
        cells = [f"{fmt_ratio(r['summary'][v['key']]['recall'])} "
                 f"({fmt_ratio(r['summary'][v['key']]['recall_worst_layer'])})" for r in rows]
        lines.append(f"| {v['label']} | " + " | ".join(cells) + " |")
    lines += _footnote(synthetic_undefined_note(report))
    lines += ["", "### IoU with the dense selection (mean over layers)", "", header, rule]
    for v in report["variants"]:
        lines.append(f"| {v['label']} | " + " | ".join(
            fmt_ratio(r["summary"][v["key"]]["iou"]) for r in rows) + " |")
    lines += ["", "### Time per indexer call, ms: median (min-max)", "",
              f"{report['environment']['device']}; each cell pools the calls of its "
              f"{s['layers']} layer(s): {timing_method(s)}.", "", header, rule]
    for v in report["variants"]:
        lines.append(f"| {v['label']} | " + " | ".join(
            fmt_timing(r["summary"][v["key"]]) for r in rows) + " |")
    lines += ["", "### Recall per layer", "",
              "| variant | " + " | ".join(f"T={r['keys']} layer {i}" for r in rows
                                         for i in range(len(r["layers"]))) + " |",
              "|---|" + "---:|" * sum(len(r["layers"]) for r in rows)]
    for v in report["variants"]:
        lines.append(f"| {v['label']} | " + " | ".join(
            fmt_ratio(layer[v["key"]]["recall"]) for r in rows for layer in r["layers"]) + " |")
    return lines + [""]


def _captured_markdown(report: dict) -> list[str]:
    captured = report["captured"]
    if captured is None:
        return []
    sites = captured["sites"]
    variant_keys = [v for v in report["variants"]
                    if any(v["key"] in site["results"] for site in sites)]
    lines = [f"## Captured: `{captured['file']}`", "",
             f"{len(sites)} indexer site(s) in call order (one per layer and forward call).", "",
             "### Recall of the dense selection per site", "",
             "| site | T | S | H | k_top | ran as | " + " | ".join(v["label"] for v in variant_keys)
             + " |", "|---|---:|---:|---:|---:|---|" + "---:|" * len(variant_keys)]
    for site in sites:
        cells = [fmt_ratio(site["results"][v["key"]]["recall"]) if v["key"] in site["results"]
                 else "skipped" for v in variant_keys]
        lines.append(f"| {site['site']} | {site['keys']} | {site['queries']} | {site['heads']} | "
                     f"{site['k_top']} | {site['variant_run']} | " + " | ".join(cells) + " |")
    lines += _footnote(captured_undefined_note(report))
    lines += ["", "### Over all sites", "",
              f"Time: ms of one call, median (min-max) over the calls of every site: "
              f"{timing_method(report['settings'])}.", "",
              "| variant | recall (mean) | recall (worst site) | IoU (mean) | ms per call |",
              "|---|---:|---:|---:|---:|"]
    for v in variant_keys:
        summary = captured["summary"][v["key"]]
        lines.append(f"| {v['label']} | {fmt_ratio(summary['recall'])} | "
                     f"{fmt_ratio(summary['recall_worst_layer'])} | {fmt_ratio(summary['iou'])} | "
                     f"{fmt_timing(summary)} |")
    return lines + [""]


def _footnote(note: Optional[str]) -> list[str]:
    return ["", note] if note else []


def _needle_markdown(report: dict) -> list[str]:
    needle = report["needle"]
    if needle is None:
        return []
    s = report["settings"]
    lines = ["## Needle in a haystack (synthetic)", "",
             f"One needle per cell, planted at the given depth of a structured workload of T keys "
             f"(H={s['index_heads']}, D={s['head_dim']}, k_top={s['k_top']}); the needle "
             f"out-scores every other key under the dense indexer for the last "
             f"{s['needle_searchers']} of {s['needle_queries']} queries, which look for it. A "
             "cell is the fraction of those queries whose selection contains it.", ""]
    if needle.get("png"):
        lines += [f"![needle heatmap]({needle['png']})", ""]
    lines += ["| variant | retrieved (mean over cells) | cells fully retrieved |",
              "|---|---:|---:|"]
    for key, grid in needle["grids"].items():
        cells = [v for row in grid for v in row]
        full = sum(1 for v in cells if v >= 1.0)
        lines.append(f"| {needle['labels'][key]} | {fmt_ratio(needle['summary'][key])} | "
                     f"{full}/{len(cells)} |")
    return lines + [""]


def terminal_tables(report: dict) -> str:
    """Plain-text tables for the terminal: recall / IoU and time per length, captured summary,
    needle summary."""
    blocks = []
    if report["synthetic"] is not None:
        blocks += [_terminal_quality(report), _terminal_times(report)]
    captured = report["captured"]
    if captured is not None:
        head = [["variant", "recall", "worst site", "IoU", "ms per call: median (min-max)"]]
        body = [[v["label"], fmt_ratio(captured["summary"][v["key"]]["recall"]),
                 fmt_ratio(captured["summary"][v["key"]]["recall_worst_layer"]),
                 fmt_ratio(captured["summary"][v["key"]]["iou"]),
                 fmt_timing(captured["summary"][v["key"]])]
                for v in report["variants"] if v["key"] in captured["summary"]
                and captured["summary"][v["key"]]["timed_calls"]]
        note = captured_undefined_note(report)
        blocks.append(f"captured tensors from {captured['file']} "
                      f"({len(captured['sites'])} sites)\n" + _aligned(head, body)
                      + (f"\n{note}" if note else ""))
    needle = report["needle"]
    if needle is not None:
        lengths = ", ".join(length_label(n) for n in needle["lengths"])
        head = [["variant", "needle retrieved", "cells fully retrieved"]]
        body = []
        for key, grid in needle["grids"].items():
            cells = [v for row in grid for v in row]
            body.append([needle["labels"][key], fmt_ratio(needle["summary"][key]),
                         f"{sum(1 for v in cells if v >= 1.0)}/{len(cells)}"])
        blocks.append(f"needle in a haystack (synthetic): lengths {lengths} x "
                      f"{len(needle['depths'])} depths\n" + _aligned(head, body))
    if report["notes"]:
        blocks.append("\n".join(f"note: {n}" for n in report["notes"]))
    return "\n\n".join(blocks)


def _terminal_quality(report: dict) -> str:
    """Recall and IoU per context length, with the n/a footnote where k_top >= T."""
    synthetic, s = report["synthetic"], report["settings"]
    rows = synthetic["rows"]
    title = (f"{synthetic['workload']} synthetic workload (generated, not a model): "
             f"H={s['index_heads']} D={s['head_dim']}, last {s['queries']} queries of T keys, "
             f"k_top={s['k_top']}, {s['layers']} layer(s)")
    head = [["variant"] + [cell for r in rows for cell in (f"T={r['keys']}", "")],
            [""] + ["recall", "IoU"] * len(rows)]
    body = [[v["label"]] + [cell for r in rows for cell in (
        fmt_ratio(r["summary"][v["key"]]["recall"]), fmt_ratio(r["summary"][v["key"]]["iou"]))]
        for v in report["variants"]]
    note = synthetic_undefined_note(report)
    return title + "\n" + _aligned(head, body, group=2) + (f"\n{note}" if note else "")


def _terminal_times(report: dict) -> str:
    """Time per indexer call per context length: median (min-max)."""
    rows = report["synthetic"]["rows"]
    title = (f"time per indexer call, ms: median (min-max) over the calls of the "
             f"{report['settings']['layers']} layer(s); {report['environment']['device']}\n"
             f"({timing_method(report['settings'])})")
    head = [["variant"] + [f"T={r['keys']}" for r in rows]]
    body = [[v["label"]] + [fmt_timing(r["summary"][v["key"]]) for r in rows]
            for v in report["variants"]]
    return title + "\n" + _aligned(head, body)


def _aligned(head: list[list[str]], body: list[list[str]], group: int = 0) -> str:
    table = head + body
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for row in table:
        cells = []
        for i, cell in enumerate(row):
            cells.append(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]))
            if group and i > 0 and i % group == 0 and i < len(row) - 1:
                cells.append("|")
        lines.append("  ".join(cells))
    rule = "-" * max(len(line) for line in lines)
    return "\n".join(lines[:len(head)] + [rule] + lines[len(head):])


def _json_safe(value):
    """NaN (a mean over no informative query) becomes null: strict JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def _mean(values: list) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")
