"""misa::paged_decode_topk on the GPU: the unpaged decode path of select.py (router, routed head
gather, heads-as-rows scores, top-k of the score rows) with the kernels reading keys straight
from their pages. Nothing copies the pages into contiguous keys: decode is bound by key reads,
and a gather would read and write every key once more."""
from __future__ import annotations

from typing import Optional

import torch

from .query_scores import query_scores
from .router import route_heads
from .row_topk import topk_rows
from .select import _gather_routed


def paged_decode_topk(q: torch.Tensor, k_cache: torch.Tensor, w: torch.Tensor,
                      block_table: torch.Tensor, seq_lens: torch.Tensor, k_top: int,
                      active_heads: int, block_size: int, scale: float,
                      k_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values fp32, indices int64) [B, min(k_top, pages * page)]; q [B, H, D], w [B, H] (a
    per-query scale already folded in), k_cache [P, page, D], k_scale [P, page]. Unordered."""
    batch = q.shape[0]
    T = block_table.shape[1] * k_cache.shape[1]
    # The kernels read the table rows and the lengths with unit strides, and the key ranges
    # built from seq_lens must share one layout (start and end are read with the same strides).
    block_table, seq_lens = block_table.contiguous(), seq_lens.contiguous()
    K = min(k_top, T)
    q, w = q[:, None], w[:, None]
    key_end = seq_lens.view(batch, 1)
    vis = dict(causal=False, key_start=torch.zeros_like(key_end), key_end=key_end)
    if active_heads:
        heads = route_heads(q, k_cache, w, active_heads, block_size, **vis, k_scale=k_scale,
                            block_table=block_table, seq_lens=seq_lens)
        q, w = _gather_routed(q, w, heads)
    scores = torch.empty(batch, 1, T, dtype=torch.float32, device=q.device)
    query_scores(q, k_cache, w, scores, rows=1, row0=0, scale=scale, k_scale=k_scale,
                 block_table=block_table, **vis)
    values = torch.empty(batch, 1, K, dtype=torch.float32, device=q.device)
    indices = torch.empty(batch, 1, K, dtype=torch.int64, device=q.device)
    # -inf tail entries point past the sequence's end: hidden keys, as in the unpaged ops.
    topk_rows(scores, K, values, indices, tail_base=seq_lens.long())
    return values[:, 0], indices[:, 0]
