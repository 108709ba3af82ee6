"""Generated indexer layers with planted head redundancy, for the tuner's tests."""
from __future__ import annotations

import torch

from misa_compile.eval.workloads import make_workload
from misa_compile.tune import TuneSite


def planted_site(name: str, layer: int, redundant: bool, *, queries=96, keys=512, heads=16,
                 dim=32, k_top=32, seed=0) -> TuneSite:
    """A structured workload layer. `redundant`: every head is a scaled copy of head 0 with a
    positive weight, so any one head ranks the keys as all of them do (h = 1 is exact);
    otherwise the heads differ as the structured workload makes them."""
    workload = make_workload("structured", queries=queries, keys=keys, heads=heads, dim=dim,
                             seed=seed + layer)
    q, w = workload.q, workload.w
    if redundant:
        gen = torch.Generator().manual_seed(seed)
        factors = 0.5 + torch.rand(heads, generator=gen)
        q = q[:, :, :1] * factors[:, None]
        w = w[:, :, :1].abs() * factors
    return TuneSite(name=name, selector=layer, q=q.contiguous(), k=workload.k, w=w.contiguous(),
                    k_top=k_top)
