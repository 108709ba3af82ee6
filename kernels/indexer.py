"""One call for a whole indexer site: the variant of a MisaConfig spelled as a chain of misa ops.
The graph pass emits exactly this chain; the benchmarks, the demo and the evaluation call it."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..config import MisaConfig

INT64_MAX = 2 ** 63 - 1


def indexer_topk(q: Tensor, k: Tensor, w: Tensor, k_top: int, config: MisaConfig = MisaConfig(), *,
                 scale: float = 1.0, causal: bool = True, key_start: Optional[Tensor] = None,
                 key_end: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                 q_scale: Optional[Tensor] = None, k_scale: Optional[Tensor] = None
                 ) -> tuple[Tensor, Tensor]:
    """Top-k keys per query as selected by `config.variant`; see ops.py for the arguments
    (q_scale / k_scale dequantize FP8 q / k and reach every op of the chain)."""
    if not isinstance(config, MisaConfig):
        raise TypeError(f"indexer_topk: config must be a MisaConfig (e.g. MisaConfig(variant="
                        f"\"misa\", active_heads=8)), got {type(config).__name__}")
    # A torch.SymInt (under torch.compile) passes; the ops bound it themselves.
    if isinstance(k_top, bool) or not isinstance(k_top, (int, torch.SymInt)):
        raise TypeError(f"indexer_topk: k_top must be an int, got {type(k_top).__name__}")
    if isinstance(k_top, int) and not 1 <= k_top <= INT64_MAX:
        # The ops' k_top is an int64: the dispatcher would refuse a larger value with a message
        # about types. Any k_top >= T selects every key, so there is no need for more.
        raise ValueError(f"indexer_topk: k_top={k_top}; allowed range is [1, 2**63 - 1] (the ops "
                         "take an int64; min(k_top, T) keys are selected)")
    ops = torch.ops.misa
    config.check_site(q.shape[2], k_top)
    vis = dict(causal=causal, key_start=key_start, key_end=key_end, mask=mask)
    run = dict(chunk=config.query_chunk, q_scale=q_scale, k_scale=k_scale)
    if config.variant == "dense":
        return ops.dense_topk(q, k, w, k_top, scale, **vis, **run)
    if config.variant == "hisa":
        candidates = ops.hisa_candidates(q, k, w, config.hisa_block, config.hisa_blocks, **vis,
                                         **run)
        return ops.rerank_topk(q, k, w, candidates, k_top, scale, **vis, **run)
    heads = ops.route_heads(q, k, w, config.active_heads, config.block_size, config.router, **vis,
                            **run)
    if config.variant == "misa":
        return ops.routed_topk(q, k, w, heads, k_top, scale, **vis, **run)
    _, candidates = ops.routed_topk(q, k, w, heads, config.candidates, scale, **vis, **run)
    return ops.rerank_topk(q, k, w, candidates, k_top, scale, **vis, **run)
