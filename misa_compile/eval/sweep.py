"""Runs every variant on each layer (a synthetic workload or a captured site), compares it with
the dense selection of the same inputs, and times it."""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from misa_compile.kernels import indexer_topk

from .capture import CapturedSite
from .metrics import selection_quality, visible_key_counts
from .settings import EvalSettings
from .variants import VariantSpec
from .workloads import make_workload

Progress = Optional[Callable[[int], object]]


def evaluate_layer(q: Tensor, k: Tensor, w: Tensor, k_top: int, specs: Sequence[VariantSpec], *,
                   scale: float = 1.0, causal: bool = True, key_start: Optional[Tensor] = None,
                   key_end: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                   repeats: int = 1, progress: Progress = None) -> dict:
    """{spec.key: {recall, iou, recall_min, queries, ms_calls, ms_median, ms_min, ms_max,
    timed_calls}} for one layer; dense is the reference and must be specs[0]. The call whose
    result is measured is the warm-up; `repeats` timed calls follow it (0: that first call is
    the one timing, warm-up included)."""
    if specs[0].config.variant != "dense":
        raise ValueError("evaluate_layer: specs[0] must be the dense reference")
    visibility = dict(causal=causal, key_start=key_start, key_end=key_end, mask=mask)
    counts = visible_key_counts(q, k, **visibility)
    results, dense = {}, None
    for spec in specs:
        config = spec.config_for(k_top)

        def call():
            return indexer_topk(q, k, w, k_top, config, scale=scale, **visibility)

        selection, first_ms = _timed(call, q.device)
        calls_ms = [_timed(call, q.device)[1] for _ in range(repeats)] or [first_ms]
        dense = selection if dense is None else dense
        quality = selection_quality(selection, dense, counts, k_top)
        results[spec.key] = dict(quality.as_dict(), ms_calls=calls_ms, **timing_summary(calls_ms))
        if progress is not None:
            progress(1)
    return results


def synthetic_sweep(settings: EvalSettings, specs: Sequence[VariantSpec],
                    device: torch.device, progress: Progress = None) -> list[dict]:
    """One entry per context length: {keys, layers: [per-layer results]}."""
    rows = []
    for keys in settings.lengths:
        layers = []
        for layer in range(settings.layers):
            workload = make_workload(
                settings.workload, batch=1, queries=min(settings.queries, keys), keys=keys,
                heads=settings.index_heads, dim=settings.head_dim,
                seed=layer_seed(settings.seed, keys, layer), dtype=settings.dtype, device=device)
            layers.append(evaluate_layer(workload.q, workload.k, workload.w, settings.k_top,
                                         specs, repeats=settings.repeats, progress=progress))
        rows.append(dict(keys=keys, layers=layers))
    return rows


def captured_sweep(sites: Sequence[CapturedSite], specs_for: Callable[[int], list],
                   repeats: int, progress: Progress = None) -> list[dict]:
    """One entry per captured site: {site, keys, queries, heads, k_top, results}.
    `specs_for(H)` gives the variants that fit a site with H heads."""
    rows = []
    for site in sites:
        results = evaluate_layer(site.q, site.k, site.w, site.k_top, specs_for(site.heads),
                                 scale=site.scale, repeats=repeats, progress=progress,
                                 **site.visibility)
        rows.append(dict(site=site.name, keys=site.keys, queries=site.q.shape[1],
                         heads=site.heads, k_top=site.k_top, variant_run=site.variant,
                         results=results))
    return rows


def summarise_layers(layers: Sequence[dict], key: str) -> dict:
    """Mean over layers of recall / IoU, the worst layer's recall, and the timing of every
    layer's timed calls pooled: the layers of one context length have the same shapes, so their
    calls are samples of one time, and pooling gives the median more of them."""
    per_layer = [layer[key] for layer in layers if key in layer]
    recalls = [r["recall"] for r in per_layer if not math.isnan(r["recall"])]
    ious = [r["iou"] for r in per_layer if not math.isnan(r["iou"])]
    nan = float("nan")
    return dict(recall=sum(recalls) / len(recalls) if recalls else nan,
                recall_worst_layer=min(recalls) if recalls else nan,
                iou=sum(ious) / len(ious) if ious else nan,
                **timing_summary([ms for r in per_layer for ms in r["ms_calls"]]))


def timing_summary(calls_ms: Sequence[float]) -> dict:
    """Median, min and max of timed calls (NaN when there are none) and how many there were:
    the median resists a call that the machine happened to slow down, min and max show how
    much the calls spread."""
    if not calls_ms:
        nan = float("nan")
        return dict(ms_median=nan, ms_min=nan, ms_max=nan, timed_calls=0)
    return dict(ms_median=statistics.median(calls_ms), ms_min=min(calls_ms),
                ms_max=max(calls_ms), timed_calls=len(calls_ms))


def layer_seed(seed: int, keys: int, layer: int) -> int:
    """Distinct, reproducible seeds per (run seed, context length, layer)."""
    return (seed * 1_000_003 + keys * 7919 + layer * 104_729) % (2 ** 63)


def _timed(call: Callable[[], object], device: torch.device) -> tuple[object, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, (time.perf_counter() - start) * 1e3
