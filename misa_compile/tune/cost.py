"""What each setting of an indexer site costs, relative to the dense indexer at the same site.

Relative FLOPs (the default, no GPU needed), per query over a site of T keys, H heads, head dim D,
router block B (operations counted as multiply-adds x 2, one comparison per selection candidate):

    score(h, n) = h * n * (2D + 2)        q.k over D, ReLU, times the head weight, summed
    select(n)   = n                        one comparison per key offered to the top-k
    route       = H * ceil(T / B) * (2D + 1) + H     q . pooled key per block and head, pick h of H
    dense              = score(H, T) + select(T)
    misa(h)            = route + score(h, T) + select(T)
    misa_hier(h, C)    = misa(h) + score(H, C) + select(C)   (C routed candidates re-ranked)

The pooled block keys are shared by every query and left out. FLOPs ignore memory traffic and
kernel overheads: on a GPU the fixed costs (router, selection) weigh more than these counts say
(README: h = 8 of 64 is 3x faster than dense at 8192 x 64K on an H100, where FLOPs say 8x), so measured times
(MeasuredTimes) give the better prediction where a benchmark was run at the production shape."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional


@dataclass(frozen=True)
class SiteShape:
    heads: int
    keys: int
    dim: int
    block_size: int


def relative_flops(variant: str, shape: SiteShape, active_heads: int = 0,
                   candidates: int = 0) -> float:
    """The setting's FLOPs per query over the dense indexer's at the same site (module doc)."""
    return _flops(variant, shape, active_heads, candidates) / dense_flops(shape)


def dense_flops(shape: SiteShape) -> float:
    """FLOPs per query of the dense indexer at a site of this shape."""
    return _flops("dense", shape, 0, 0)


def _flops(variant: str, shape: SiteShape, active_heads: int, candidates: int) -> float:
    def score(heads: int, keys: int) -> float:
        return heads * keys * (2 * shape.dim + 2)

    if variant == "dense":
        return score(shape.heads, shape.keys) + shape.keys
    route = shape.heads * math.ceil(shape.keys / shape.block_size) * (2 * shape.dim + 1) + shape.heads
    routed = route + score(active_heads, shape.keys) + shape.keys
    if variant == "misa":
        return routed
    if variant == "misa_hier":
        kept = min(candidates, shape.keys)
        return routed + score(shape.heads, kept) + kept
    raise ValueError(f"relative_flops: variant {variant!r} has no cost model (dense, misa, "
                     "misa_hier)")


class MeasuredTimes:
    """Relative cost from measured times of each variant, one JSON object in any time unit:

        {"dense": 19.5, "misa": {"4": 5.9, "8": 6.6, "16": 8.1}, "misa_hier": {"8": 24.5}}

    (e.g. from bench/bench_indexer.py at the production shape). An h between two measured ones
    is interpolated linearly; outside the measured range the nearest measurement is used, which
    never makes an unmeasured h look cheaper than a measured one. The same times apply to every
    site, so they suit models whose indexer sites share one shape."""

    def __init__(self, dense: float, routed: Mapping[str, Mapping[int, float]], source: str = ""):
        if not dense > 0:
            raise ValueError(f"measured times: dense={dense!r} must be > 0")
        self.dense = float(dense)
        self.routed = {variant: dict(sorted(times.items())) for variant, times in routed.items()}
        self.source = source

    @classmethod
    def from_file(cls, path: str | Path) -> "MeasuredTimes":
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or "dense" not in data:
            raise ValueError(f"{path}: expected a JSON object with a 'dense' time and per-h times "
                             "under 'misa' (and optionally 'misa_hier')")
        unknown = sorted(set(data) - {"dense", "misa", "misa_hier"})
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; allowed: dense, misa, misa_hier")
        routed = {}
        for variant in ("misa", "misa_hier"):
            times = data.get(variant, {})
            if not isinstance(times, dict):
                raise ValueError(f"{path}: '{variant}' must map h to a time, got {times!r}")
            try:
                routed[variant] = {int(h): float(t) for h, t in times.items()}
            except (TypeError, ValueError) as error:
                raise ValueError(f"{path}: '{variant}': {error}") from error
            if any(t <= 0 or h < 1 for h, t in routed[variant].items()):
                raise ValueError(f"{path}: '{variant}': every h must be >= 1, every time > 0")
        if not routed["misa"]:
            raise ValueError(f"{path}: no 'misa' times: give at least one h")
        return cls(float(data["dense"]), routed, source=str(path))

    def relative(self, variant: str, active_heads: int = 0) -> Optional[float]:
        """Time of the setting over dense; None for a variant without measurements."""
        if variant == "dense":
            return 1.0
        times = self.routed.get(variant)
        if not times:
            return None
        return _interpolate(times, active_heads) / self.dense


def _interpolate(points: Mapping[int, float], x: int) -> float:
    xs = list(points)
    if x <= xs[0]:
        return points[xs[0]]
    if x >= xs[-1]:
        return points[xs[-1]]
    for left, right in zip(xs, xs[1:]):
        if left <= x <= right:
            t = (x - left) / (right - left)
            return points[left] + t * (points[right] - points[left])
    raise AssertionError("unreachable: x lies within the measured range")


class CostModel:
    """Relative cost of a setting at a site: measured times where given for its variant, else
    relative FLOPs."""

    def __init__(self, measured: Optional[MeasuredTimes] = None):
        self.measured = measured

    @property
    def description(self) -> str:
        if self.measured is None:
            return "relative FLOPs (docs/tune.md)"
        return (f"measured times from {self.measured.source or 'the given table'}, relative "
                "FLOPs for variants it does not cover")

    def relative(self, variant: str, shape: SiteShape, active_heads: int = 0,
                 candidates: int = 0) -> float:
        if self.measured is not None:
            measured = self.measured.relative(variant, active_heads)
            if measured is not None:
                return measured
        return relative_flops(variant, shape, active_heads, candidates)
