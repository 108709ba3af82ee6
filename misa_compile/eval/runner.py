"""One evaluation run: synthetic recall sweep, captured-tensor sweep and needle grid, as the
settings ask, assembled into a report (report.py)."""
from __future__ import annotations

import dataclasses
import platform
from pathlib import Path
from typing import Optional

import torch

from .capture import load_sites
from .needle import needle_grid, needle_specs
from .report import build_report
from .settings import EvalSettings
from .sweep import captured_sweep, synthetic_sweep
from .variants import variant_specs


def run_evaluation(settings: EvalSettings, *, device: torch.device | str = "cpu",
                   captured: Optional[str | Path] = None, needle: bool = True,
                   progress: bool = False) -> dict:
    """Runs what `settings` and `captured` ask for and returns the report document."""
    device = torch.device(device)
    base = settings.base_config()
    sites = load_sites(captured, device=device) if captured is not None else []
    specs, notes = variant_specs(settings.variants, settings.active_heads,
                                 settings.index_heads, base)
    needle_variants = needle_specs(settings) if needle and settings.workload else []
    site_specs = {}
    for site in sites:
        if site.heads not in site_specs:
            site_specs[site.heads], site_notes = variant_specs(
                settings.variants, settings.active_heads, site.heads, base)
            notes += [f"captured sites with H={site.heads}: {n}" for n in site_notes]
    notes += _trivial_regime_notes(settings, sites)

    total = ((len(settings.lengths) * settings.layers * len(specs) if settings.workload else 0)
             + sum(len(site_specs[site.heads]) for site in sites)
             + (len(settings.needle_lengths) * len(settings.needle_depths)
                if needle_variants else 0))
    bar = _progress_bar(total) if progress else None
    step = bar.update if bar is not None else None
    try:
        synthetic = (synthetic_sweep(settings, specs, device, step) if settings.workload
                     else None)
        captured_rows = (captured_sweep(sites, lambda heads: site_specs[heads], settings.repeats,
                                        step) if sites else None)
        grid = needle_grid(settings, needle_variants, device, step) if needle_variants else None
    finally:
        if bar is not None:
            bar.close()
    all_specs = {spec.key: spec for spec in specs}
    for group in site_specs.values():
        for spec in group:
            all_specs.setdefault(spec.key, spec)
    variants = [dict(key=spec.key, label=spec.label, config=dataclasses.asdict(spec.config))
                for spec in all_specs.values()]
    return build_report(
        settings=settings.as_dict(), environment=environment(device), variants=variants,
        notes=notes, synthetic=synthetic,
        captured=(dict(file=str(captured), sites=captured_rows) if sites else None),
        needle=grid)


def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = (f"CPU ({platform.processor() or platform.machine()}, "
                f"{torch.get_num_threads()} threads)")
    return dict(device=name, torch=torch.__version__, python=platform.python_version())


def _trivial_regime_notes(settings: EvalSettings, sites) -> list[str]:
    """Says where a variant is exact by construction, so its 1.000 is not read as a result."""
    notes = []
    lengths = list(settings.lengths) if settings.workload else []
    lengths += [site.keys for site in sites]
    kept = settings.hisa_block * settings.hisa_blocks
    exact_hisa = sorted({t for t in lengths if t <= kept})
    if exact_hisa and "hisa" in settings.variants:
        notes.append(f"HISA keeps {settings.hisa_blocks} blocks of {settings.hisa_block} = {kept} "
                     f"keys: it is exact by construction at T = {', '.join(map(str, exact_hisa))}")
    exact_hier = sorted({t for t in lengths if t <= settings.candidates})
    if exact_hier and "misa_hier" in settings.variants:
        notes.append(f"MISA-hier re-ranks {settings.candidates} candidates: it is exact by "
                     f"construction at T = {', '.join(map(str, exact_hier))}")
    return notes


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="misa eval", unit="run", leave=False, dynamic_ncols=True)
