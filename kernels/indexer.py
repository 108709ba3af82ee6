"""One call for a whole indexer site: the variant of a MisaConfig spelled as a chain of misa ops.
The graph pass emits exactly this chain; the benchmarks, the demo and the evaluation call it."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..config import MisaConfig


def indexer_topk(q: Tensor, k: Tensor, w: Tensor, k_top: int, config: MisaConfig = MisaConfig(), *,
                 scale: float = 1.0, causal: bool = True, key_start: Optional[Tensor] = None,
                 key_end: Optional[Tensor] = None, mask: Optional[Tensor] = None
                 ) -> tuple[Tensor, Tensor]:
    """Top-k keys per query as selected by `config.variant`; see ops.py for the arguments."""
    ops = torch.ops.misa
    config.check_site(q.shape[2], k_top)
    vis = dict(causal=causal, key_start=key_start, key_end=key_end, mask=mask)
    chunk = config.query_chunk
    if config.variant == "dense":
        return ops.dense_topk(q, k, w, k_top, scale, **vis, chunk=chunk)
    if config.variant == "hisa":
        candidates = ops.hisa_candidates(q, k, w, config.hisa_block, config.hisa_blocks, **vis,
                                         chunk=chunk)
        return ops.rerank_topk(q, k, w, candidates, k_top, scale, **vis, chunk=chunk)
    heads = ops.route_heads(q, k, w, config.active_heads, config.block_size, config.router, **vis,
                            chunk=chunk)
    if config.variant == "misa":
        return ops.routed_topk(q, k, w, heads, k_top, scale, **vis, chunk=chunk)
    _, candidates = ops.routed_topk(q, k, w, heads, config.candidates, scale, **vis, chunk=chunk)
    return ops.rerank_topk(q, k, w, candidates, k_top, scale, **vis, chunk=chunk)
