"""Per site: measure the recall of the dense selection for each active-head count h (and for
MISA-hierarchical where plain MISA cannot reach the target), on tuning queries and on held-out
ones, and choose the cheapest setting that meets the target on the tuning queries.

Queries are split by alternation: among the queries that see more than k_top keys (the only ones
a selection can get wrong, misa_compile.eval.metrics), the 1st, 3rd, ... tune and the 2nd, 4th,
... are held out. Alternating keeps both halves spread over the same context lengths, which a
first-70%-of-rows split would not under causal visibility."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from misa_compile.config import MisaConfig
from misa_compile.eval.metrics import visible_key_counts
from misa_compile.kernels import indexer_topk
from misa_compile.kernels.reference import selection_recall

from .cost import CostModel, SiteShape, dense_flops
from .sites import TuneSite

METRICS = ("mean", "p10")


@dataclass(frozen=True)
class TuneSettings:
    """target_recall: the recall of the dense selection a site must keep, in (0, 1].
    metric:        "mean" (average over queries) or "p10" (the 10th-percentile query).
    block_size:    the MISA router's key block, written into the tuned config.
    candidates:    MISA-hierarchical candidates; None: 4 x the site's k_top.
    heads:         the h grid; None: 1, 2, 4, ... up to H, and H.
    baseline_heads: the uniform setting the speedup is quoted against (h = 8, the paper's)."""

    target_recall: float = 0.95
    metric: str = "mean"
    block_size: int = 1024
    candidates: Optional[int] = None
    heads: Optional[tuple] = None
    baseline_heads: int = 8

    def __post_init__(self) -> None:
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"target_recall={self.target_recall}: must be in (0, 1]")
        if self.metric not in METRICS:
            raise ValueError(f"metric={self.metric!r}: allowed values are {METRICS}")
        for name in ("block_size", "baseline_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.candidates is not None and self.candidates < 1:
            raise ValueError(f"candidates={self.candidates}: must be >= 1")
        if self.heads is not None and (not self.heads or min(self.heads) < 1):
            raise ValueError(f"heads={self.heads}: give h values >= 1")

    def head_grid(self, num_heads: int) -> list[int]:
        grid = set(self.heads) if self.heads else {2 ** i for i in range(num_heads.bit_length())}
        grid |= {num_heads, min(self.baseline_heads, num_heads)}
        return sorted(h for h in grid if h <= num_heads)


@dataclass(frozen=True)
class Point:
    """One setting measured at one site. Recalls are the settings' metric (mean or p10) over the
    tuning and the held-out queries; NaN where a half has no query."""

    variant: str
    active_heads: int
    candidates: int
    cost: float
    tune_recall: float
    held_out_recall: float

    @property
    def label(self) -> str:
        if self.variant == "dense":
            return "dense"
        name = "MISA" if self.variant == "misa" else f"MISA-hier C={self.candidates}"
        return f"{name} h={self.active_heads}"

    def overrides(self) -> dict:
        """The MisaConfig.sites entry that runs this setting."""
        if self.variant == "dense":
            return {"variant": "dense"}
        entry = {"variant": self.variant, "active_heads": self.active_heads}
        if self.variant == "misa_hier":
            entry["candidates"] = self.candidates
        return entry


@dataclass
class SiteResult:
    name: str
    selector: object
    heads: int
    keys: int
    k_top: int
    tune_queries: int
    held_out_queries: int
    weight: float              # the site's dense FLOPs (all its queries): its share of the model
    points: list = field(default_factory=list)
    chosen: Optional[Point] = None
    baseline: Optional[Point] = None

    def as_dict(self) -> dict:
        return dict(name=self.name, selector=self.selector, heads=self.heads, keys=self.keys,
                    k_top=self.k_top, tune_queries=self.tune_queries,
                    held_out_queries=self.held_out_queries, weight=self.weight,
                    chosen=dataclasses.asdict(self.chosen),
                    baseline=dataclasses.asdict(self.baseline),
                    points=[dataclasses.asdict(p) for p in self.points])


@dataclass
class TuneResult:
    settings: TuneSettings
    cost_model: str
    sites: list
    config: MisaConfig

    def relative_cost(self, which: str) -> float:
        """The model's indexer cost under the chosen ("chosen") or the uniform ("baseline")
        settings, relative to dense: the sites' relative costs weighted by their dense FLOPs."""
        total = sum(site.weight for site in self.sites)
        return sum(site.weight * getattr(site, which).cost for site in self.sites) / total


def tune_sites(sites: Sequence[TuneSite], settings: TuneSettings, cost: CostModel = CostModel(),
               progress: Optional[Callable[[str], object]] = None) -> TuneResult:
    """Measures and chooses per site; the result's config runs every site with its choice."""
    results = []
    for site in sites:
        if progress is not None:
            progress(site.name)
        results.append(tune_site(site, settings, cost))
    return TuneResult(settings=settings, cost_model=cost.description, sites=results,
                      config=tuned_config(results, settings))


def tune_site(site: TuneSite, settings: TuneSettings, cost: CostModel) -> SiteResult:
    shape = SiteShape(site.heads, site.keys, site.dim, settings.block_size)
    tune_rows, held_rows = split_queries(site)
    dense_values, dense_indices = _select(site, MisaConfig(variant="dense"))
    result = SiteResult(name=site.name, selector=site.selector, heads=site.heads, keys=site.keys,
                        k_top=site.k_top, tune_queries=int(tune_rows.sum()),
                        held_out_queries=int(held_rows.sum()),
                        weight=dense_flops(shape) * site.q.shape[0] * site.q.shape[1])

    def measure(variant: str, heads: int, candidates: int = 0) -> Point:
        config = MisaConfig(variant=variant, active_heads=heads, block_size=settings.block_size,
                            **({"candidates": candidates} if candidates else {}))
        values, indices = _select(site, config)
        recall = selection_recall(indices, values, dense_indices, dense_values)
        point = Point(variant, heads, candidates,
                      cost.relative(variant, shape, heads, candidates),
                      _metric(recall[tune_rows], settings.metric),
                      _metric(recall[held_rows], settings.metric))
        result.points.append(point)
        return point

    result.points.append(Point("dense", site.heads, 0, 1.0, 1.0, 1.0))
    plain = [measure("misa", h) for h in settings.head_grid(site.heads)]
    # h = H routes every head: the dense selection at more than dense's cost, so only h < H
    # counts as plain MISA reaching the target.
    if not any(_meets(p, settings) for p in plain if p.active_heads < site.heads):
        candidates = settings.candidates or 4 * site.k_top
        if site.k_top <= candidates < site.keys:
            for h in settings.head_grid(site.heads):
                if h < site.heads:
                    measure("misa_hier", h, candidates)
    result.chosen = min((p for p in result.points if _meets(p, settings)),
                        key=lambda p: (p.cost, -p.tune_recall, p.active_heads))
    baseline_heads = min(settings.baseline_heads, site.heads)
    result.baseline = next(p for p in plain if p.active_heads == baseline_heads)
    return result


def split_queries(site: TuneSite) -> tuple[Tensor, Tensor]:
    """Boolean [B, S] masks of the tuning and held-out queries (module doc)."""
    counts = visible_key_counts(site.q, site.k, **site.visibility)
    informative = (counts > site.k_top).flatten()
    order = informative.long().cumsum(0)  # 1, 2, ... along the informative queries
    tune = informative & (order % 2 == 1)
    held = informative & (order % 2 == 0)
    return tune.view(counts.shape), held.view(counts.shape)


def tuned_config(results: Sequence[SiteResult], settings: TuneSettings) -> MisaConfig:
    """Every tuned site addressed by its selector; sites the tuning did not see run plain MISA
    with the largest h any site chose (8 when none chose MISA), the cautious default."""
    routed = [r.chosen.active_heads for r in results if r.chosen.variant != "dense"]
    return MisaConfig(variant="misa", active_heads=max(routed, default=8),
                      block_size=settings.block_size,
                      sites={r.selector: r.chosen.overrides() for r in results})


def _select(site: TuneSite, config: MisaConfig) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        return indexer_topk(site.q, site.k, site.w, site.k_top, config, scale=site.scale,
                            **site.visibility)


def _metric(recall: Tensor, metric: str) -> float:
    if recall.numel() == 0:
        return math.nan
    if metric == "mean":
        return float(recall.mean())
    return float(torch.quantile(recall.double(), 0.10))


def _meets(point: Point, settings: TuneSettings) -> bool:
    # No informative tuning query (NaN): every setting selects every visible key.
    return math.isnan(point.tune_recall) or point.tune_recall >= settings.target_recall
