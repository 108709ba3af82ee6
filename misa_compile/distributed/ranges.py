"""Visibility of a sharded call, spelled as one global key range per query. The single-device
rule (end-aligned causality AND an optional ragged range [key_start, key_end)) always leaves a
contiguous range of global keys visible, so each rank can translate it into a range of its own
local keys and hand that to the single-device ops with causal=False."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def global_key_ranges(batch: int, queries: int, total_keys: int, causal: bool,
                      key_start: Optional[Tensor], key_end: Optional[Tensor],
                      device: torch.device) -> tuple[Tensor, Tensor]:
    """(lo, hi) int64 [B, S]: query (b, i) sees global keys [lo, hi); hi <= lo means none."""
    if key_start is not None:
        lo = key_start.to(device=device, dtype=torch.int64)
        hi = key_end.to(device=device, dtype=torch.int64)
    else:
        lo = torch.zeros(batch, queries, dtype=torch.int64, device=device)
        hi = torch.full((batch, queries), total_keys, dtype=torch.int64, device=device)
    if causal:
        # Query i of S sees keys [0, T - S + i] (end-aligned prefill; decode is S = 1).
        last_visible = total_keys - queries + torch.arange(queries, device=device)
        hi = torch.minimum(hi, last_visible + 1)
    return lo.clamp(0, total_keys), hi.clamp(0, total_keys)


def local_key_ranges(lo: Tensor, hi: Tensor, offset: int, size: int) -> tuple[Tensor, Tensor]:
    """The part of [lo, hi) held by the shard [offset, offset + size), in local coordinates;
    empty ranges come out as start == end."""
    start = (lo - offset).clamp(0, size)
    end = (hi - offset).clamp(0, size)
    return start, torch.maximum(start, end)


def visible_blocks(lo: Tensor, hi: Tensor, block_starts: Tensor, block_ends: Tensor) -> Tensor:
    """bool [B, S, n]: whether global block [block_starts[n], block_ends[n]) holds a visible key
    of each query (the single-device router's rule: any visible key makes the block visible)."""
    lo, hi = lo[..., None], hi[..., None]
    return (block_starts < hi) & (block_ends > lo) & (lo < hi)
