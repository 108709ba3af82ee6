"""The indexer sites a tuning runs on: the q, k, w and visibility each site saw, with the name the
graph pass reports for it and the selector a per-site config addresses it by."""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from misa_compile.config import site_module_path
from misa_compile.eval.capture import CapturedSite, capture_indexer_sites


@dataclass
class TuneSite:
    """One indexer site's inputs. `selector` is what MisaConfig.sites addresses it by: its module
    path when the pass named it, else its position in call order (a layer index for a decoder
    with one indexer per layer)."""

    name: str
    selector: Union[str, int]
    q: Tensor
    k: Tensor
    w: Tensor
    k_top: int
    scale: float = 1.0
    visibility: dict = field(default_factory=lambda: dict(causal=True))

    @property
    def heads(self) -> int:
        return self.q.shape[2]

    @property
    def keys(self) -> int:
        return self.k.shape[1]

    @property
    def dim(self) -> int:
        return self.q.shape[3]


def sites_from_capture(captured: Sequence[CapturedSite],
                       names: Optional[Sequence[str]] = None) -> list[TuneSite]:
    """TuneSites of captured sites; `names` are the pass's site names in the same (call) order.
    Without names (a saved capture holds none), each site is addressed by its position."""
    if names is not None and len(names) != len(captured):
        raise ValueError(f"sites_from_capture: {len(names)} names for {len(captured)} sites")
    selectors: list[Union[str, int]] = list(range(len(captured)))
    if names is not None:
        # Two indexers in one module share its path: only the full name tells them apart.
        paths = collections.Counter(site_module_path(name) for name in names)
        selectors = [site_module_path(name) if paths[site_module_path(name)] == 1 else name
                     for name in names]
    return [TuneSite(name=names[i] if names is not None else site.name, selector=selectors[i],
                     q=site.q, k=site.k, w=site.w, k_top=int(site.k_top), scale=site.scale,
                     visibility=site.visibility)
            for i, site in enumerate(captured)]


def capture_model_sites(model: torch.nn.Module, example_args: tuple) -> list[TuneSite]:
    """Compiles `model` with the misa backend's dense variant (the exact selection), runs it once
    on `example_args` while recording every indexer site, and names the sites after the
    backend's report. The report lists the sites in graph order, which is the order they run in
    one call; when the counts disagree (a site ran twice, or a graph was recompiled) the sites
    are addressed by position instead."""
    from misa_compile.backend import last_report

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="misa",
                             options={"variant": "dense", "target": "aot_eager"})
    with torch.no_grad(), capture_indexer_sites() as capture:
        compiled(*example_args)
    if not capture.sites:
        raise ValueError("no indexer site ran: the misa backend rewrote none of the model's "
                         "top-ks (misa_compile.explain(model, *inputs) says why)")
    names = [site.name for site in last_report().rewritten]
    return sites_from_capture(capture.sites, names if len(names) == len(capture.sites) else None)
