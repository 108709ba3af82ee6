"""misa::route_heads on the GPU: the MISA router (scoring/router_scores.py: pooled block keys,
per-head router scores), then the top-h heads of each query: in the scores kernel itself for
decode calls (few queries, H a power of two up to its tile), else by candidate_topk."""
from __future__ import annotations

from typing import Optional

import torch

from ..scoring.block_visibility import block_visibility
from ..scoring.router_scores import (pooled_keys, router_scores, router_top_heads,
                                     selects_heads)
from ..selection.candidate_topk import candidate_topk
from .scored_topk import FEW_QUERIES
from .device_checks import fold_query_scale, poison_ids, scale_faults


def route_heads(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, active_heads: int,
                block_size: int, causal: bool, key_start: Optional[torch.Tensor],
                key_end: Optional[torch.Tensor], k_scale: Optional[torch.Tensor] = None,
                block_table: Optional[torch.Tensor] = None,
                seq_lens: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None,
                kbar: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int64 [B, S, active_heads]: each query's routed heads (router = "score"). k_scale [B, T]
    dequantizes FP8 keys; a per-query scale is the caller's to fold into w (the router uses
    |w| and sums ReLU terms, both homogeneous in a positive factor). With block_table and
    seq_lens, k is a paged cache (see pooled_keys) and key_end [B, S] ends at seq_lens. `mask`
    (bool or additive, broadcastable to [B, S, T]) is read once, by block_visibility: a block
    counts for a query when any of its keys is visible to it (the mask's values do not enter
    the router score). kbar: the pooled keys [B, ceil(T / block_size), D] fp32 when the caller
    keeps them (the paged op's cache), so the router reads no key."""
    batch, queries, num_heads, _ = q.shape
    if kbar is None:
        kbar = pooled_keys(k, block_size, k_scale, block_table, seq_lens)
    T = k.shape[1] if block_table is None else block_table.shape[1] * k.shape[1]
    assert mask is None or block_table is None, "the paged op has no mask"
    blocks_seen = (None if mask is None else
                   block_visibility(mask, batch, queries, T, block_size, causal, key_start,
                                    key_end))
    router = (q, w, kbar, block_size, T, causal, key_start, key_end, blocks_seen)
    # The fused selection saves a launch but makes the scores kernel slower (H100, 64 x 64K:
    # 0.304 ms against 0.226 + 0.046 for scores and candidate_topk at 8192 queries, equal at
    # 1024; docs/results/router_topk_decode_tile_h100.json): it pays only where launches
    # dominate, for the few queries of a decode call.
    if queries < FEW_QUERIES and selects_heads(queries, num_heads):
        return router_top_heads(*router, active_heads)
    scores = router_scores(*router)
    # Top-h heads per query; among equal scores the lower head index wins (as router_top_heads).
    out = torch.empty(batch, queries, active_heads, dtype=torch.int64, device=q.device)
    top_scores = torch.empty(batch, queries, active_heads, dtype=torch.float32, device=q.device)
    candidate_topk(scores, active_heads, num_heads, top_scores, out)
    return out


def route_heads_op(q, k, w, active_heads, block_size, causal, key_start, key_end, mask,
                   q_scale=None, k_scale=None):
    """The op (inputs validated by the caller): heads of rows with a bad scale are -1."""
    heads = route_heads(q, k, fold_query_scale(w, q_scale), active_heads, block_size, causal,
                        key_start, key_end, k_scale=k_scale, mask=mask)
    return poison_ids(heads, scale_faults(q_scale, k_scale))
