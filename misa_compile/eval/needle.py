"""Needle-in-a-haystack over (context length x depth): in each cell a structured workload gets one
planted needle that the last queries look for (workloads.NeedleSpec), and a cell's value is the
fraction of those queries whose selection contains the needle (1.0 = retrieved)."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from misa_compile.config import MisaConfig
from misa_compile.kernels import indexer_topk

from .settings import EvalSettings
from .sweep import Progress, layer_seed
from .variants import VariantSpec
from .workloads import NeedleSpec, structured_workload


def needle_specs(settings: EvalSettings) -> list[VariantSpec]:
    """Dense, MISA and MISA-hier at h = settings.needle_heads, and HISA (as requested)."""
    base = settings.base_config()
    h = min(settings.needle_heads, settings.index_heads)
    specs = [VariantSpec("dense", "dense", dataclasses.replace(base, variant="dense"))]
    if "misa" in settings.variants:
        specs.append(VariantSpec(f"misa_h{h}", f"MISA h={h}",
                                 dataclasses.replace(base, variant="misa", active_heads=h)))
    if "misa_hier" in settings.variants:
        specs.append(VariantSpec(f"misa_hier_h{h}", f"MISA-hier h={h}",
                                 dataclasses.replace(base, variant="misa_hier", active_heads=h)))
    if "hisa" in settings.variants:
        specs.append(VariantSpec("hisa", "HISA", dataclasses.replace(base, variant="hisa")))
    return specs


def needle_grid(settings: EvalSettings, specs: Sequence[VariantSpec], device: torch.device,
                progress: Progress = None) -> dict:
    """{"lengths", "depths", "grids": {spec.key: [[fraction per depth] per length]},
    "labels": {spec.key: label}}."""
    grids = {spec.key: [] for spec in specs}
    for keys in settings.needle_lengths:
        rows = {spec.key: [] for spec in specs}
        for column, depth in enumerate(settings.needle_depths):
            workload = structured_workload(
                batch=1, queries=min(settings.needle_queries, keys), keys=keys,
                heads=settings.index_heads, dim=settings.head_dim,
                seed=layer_seed(settings.seed + 1, keys, column), dtype=settings.dtype,
                device=device,
                needle=NeedleSpec(depth=depth, queries=min(settings.needle_searchers,
                                                           settings.needle_queries, keys)))
            needle = workload.needles[0]
            for spec in specs:
                config: MisaConfig = spec.config_for(settings.k_top)
                selection = indexer_topk(workload.q, workload.k, workload.w, settings.k_top,
                                         config)
                rows[spec.key].append(retrieved_fraction(selection, needle))
            if progress is not None:
                progress(1)
        for key, row in rows.items():
            grids[key].append(row)
    return dict(lengths=list(settings.needle_lengths), depths=list(settings.needle_depths),
                grids=grids, labels={spec.key: spec.label for spec in specs})


def retrieved_fraction(selection: tuple[torch.Tensor, torch.Tensor], needle) -> float:
    """Fraction of the needle's queries whose selection (values, indices) holds its position
    with a finite score (entries with -inf scores are padding, whatever their index)."""
    values, indices = selection
    rows = list(needle.query_rows)
    found = (indices[needle.batch, rows] == needle.position) & values[needle.batch, rows].isfinite()
    return float(found.any(-1).float().mean())
