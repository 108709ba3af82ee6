"""What `misa tune` writes: tuned.json (the config, as torch.compile's options= and
`misa export --config` take it), tune.json (every measurement), tune.md and tune.png."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from .plot_png import save_tune_plot
from .search import TuneResult


def write_outputs(result: TuneResult, out_dir: str | Path, source: str) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"config": out / "tuned.json", "report": out / "tune.md",
               "data": out / "tune.json", "plot": out / "tune.png"}
    written["config"].write_text(json.dumps(result.config.to_options(), indent=2) + "\n")
    written["data"].write_text(json.dumps(_json_safe(summary(result, source)), indent=2) + "\n")
    written["report"].write_text(markdown(result, source))
    save_tune_plot(written["plot"], result.sites, result.settings.target_recall,
                   result.settings.metric)
    return written


def summary(result: TuneResult, source: str) -> dict:
    chosen, baseline = result.relative_cost("chosen"), result.relative_cost("baseline")
    return dict(source=source, settings=dataclasses.asdict(result.settings),
                cost_model=result.cost_model, config=result.config.to_options(),
                relative_cost=dict(tuned=chosen, uniform=baseline, dense=1.0),
                speedup=dict(over_dense=1.0 / chosen, over_uniform=baseline / chosen),
                sites=[site.as_dict() for site in result.sites])


def site_table(result: TuneResult) -> list[list[str]]:
    """Rows of the per-site table: the choice, its cost and recall (tuning, held-out), and the
    same for the uniform baseline."""
    rows = []
    for site in result.sites:
        chosen, base = site.chosen, site.baseline
        rows.append([site.name, str(site.heads), str(site.keys), chosen.label,
                     f"{chosen.cost:.3f}", _fmt(chosen.tune_recall),
                     _fmt(chosen.held_out_recall), f"{base.cost:.3f}", _fmt(base.tune_recall),
                     _fmt(base.held_out_recall)])
    return rows


TABLE_HEAD = ["site", "H", "T", "chosen", "cost", "recall tune", "recall held-out",
              "uniform cost", "uniform tune", "uniform held-out"]


def markdown(result: TuneResult, source: str) -> str:
    settings = result.settings
    chosen, baseline = result.relative_cost("chosen"), result.relative_cost("baseline")
    lines = [
        "# misa tune", "",
        f"Source: {source}. Target: {settings.metric} recall of the dense selection >= "
        f"{settings.target_recall} on the tuning queries (alternate informative queries; the "
        "others are held out). Router block "
        f"{settings.block_size}. Cost: {result.cost_model}, relative to dense. Uniform: MISA "
        f"h={settings.baseline_heads} at every site.", "",
        "| " + " | ".join(TABLE_HEAD) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(TABLE_HEAD))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in site_table(result)]
    missed = [s.name for s in result.sites if s.chosen.held_out_recall < settings.target_recall]
    lines += [
        "",
        f"Model indexer cost (sites weighted by their dense FLOPs): tuned {chosen:.3f}, uniform "
        f"h={settings.baseline_heads} {baseline:.3f}, dense 1.000. Expected speedup: "
        f"**{1 / chosen:.2f}x over dense, {baseline / chosen:.2f}x over uniform "
        f"h={settings.baseline_heads}**.", "",
        ("Held-out queries: every site meets the target." if not missed else
         f"Held-out queries: {len(missed)} site(s) below the target ({', '.join(missed)}): the "
         "choice may not generalise; tune on more inputs or raise the target."), "",
        "![recall vs h](tune.png)", "",
        "Use it: `torch.compile(model, backend=\"misa\", options=json.load(open(\"tuned.json\")))` "
        "or `misa export ... --config tuned.json`.", "",
    ]
    return "\n".join(lines)


def terminal_table(result: TuneResult) -> str:
    body = site_table(result)
    widths = [max(len(row[i]) for row in [TABLE_HEAD] + body) for i in range(len(TABLE_HEAD))]
    text = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
            for row in [TABLE_HEAD] + body]
    chosen, baseline = result.relative_cost("chosen"), result.relative_cost("baseline")
    text.append(f"expected speedup: {1 / chosen:.2f}x over dense, {baseline / chosen:.2f}x over "
                f"uniform h={result.settings.baseline_heads} ({result.cost_model})")
    return "\n".join(text)


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def _json_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
