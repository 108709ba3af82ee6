"""The MISA router over sharded keys, equal to the single-device router.

Router blocks are defined on GLOBAL key positions ([b*B, (b+1)*B), the last one partial), so a
block may straddle shards. Each block is owned by the rank holding its first key. The owner needs
the key sum of the whole block: the keys it holds itself plus, for its last block only, the keys
of the shards that start inside that block. Every rank therefore all-gathers one [B, D] partial
sum (its keys in the block holding its first key); block key counts follow from the layout. The
owner then scores its blocks, and an all-reduce of the per-head partial router scores [B, S, H]
gives every rank the same sum over all visible blocks, hence the same heads."""
from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.torch_impl import NEG_INF, query_chunks
from .collectives import all_gather_stacked, all_reduce_sum
from .ranges import visible_blocks
from .shards import ShardLayout


def owned_block_means(k_local: Tensor, layout: ShardLayout, block: int, group
                      ) -> tuple[int, Tensor]:
    """(first owned block id, mean key of each owned block [B, n_owned, D] float32).
    Collective: every rank of the group must call it."""
    batch, size, dim = k_local.shape
    offset, total = layout.offset, layout.total_keys
    in_first_block = min(size, (offset // block + 1) * block - offset)
    partial = k_local[:, :in_first_block].float().sum(1)
    partials = all_gather_stacked(partial, group, "router block partial sums")  # [W, B, D]

    first = -(-offset // block)
    owned = max(0, -(-(offset + size) // block) - first)
    if owned == 0:
        return first, k_local.new_zeros(batch, 0, dim, dtype=torch.float32)
    keys = k_local[:, first * block - offset:].float()
    keys = torch.nn.functional.pad(keys, (0, 0, 0, owned * block - keys.shape[1]))
    sums = keys.view(batch, owned, block, dim).sum(2)
    last = first + owned - 1
    for other, (other_offset, other_size) in enumerate(zip(layout.offsets, layout.sizes)):
        if other_size and other_offset > offset and other_offset // block == last:
            sums[:, -1] += partials[other]
    starts = torch.arange(first, first + owned, device=k_local.device) * block
    counts = (starts + block).clamp(max=total) - starts
    return first, sums / counts[None, :, None].float()


def sharded_router_scores(q: Tensor, k_local: Tensor, w: Tensor, block: int, layout: ShardLayout,
                          lo: Tensor, hi: Tensor, group, chunk: int = 0) -> Tensor:
    """r[b,t,j] = |w| * sum over globally visible blocks of ReLU(q . kbar), float32 [B, S, H],
    identical on every rank. Collective."""
    batch, queries, heads, _ = q.shape
    first, kbar = owned_block_means(k_local, layout, block, group)
    owned = kbar.shape[1]
    partial = torch.zeros(batch, queries, heads, dtype=torch.float32, device=q.device)
    if owned:
        starts = torch.arange(first, first + owned, device=q.device) * block
        ends = (starts + block).clamp(max=layout.total_keys)
        for rows in query_chunks(queries, batch * heads * owned, chunk):
            blocks = visible_blocks(lo[:, rows], hi[:, rows], starts, ends).float()
            per_block = torch.einsum("bchd,bnd->bchn", q[:, rows].float(), kbar).relu_()
            partial[:, rows] = torch.einsum("bchn,bcn->bch", per_block, blocks)
    all_reduce_sum(partial, group, "router scores")
    return partial * w.float().abs()


def sharded_route_heads(q: Tensor, k_local: Tensor, w: Tensor, active_heads: int, block: int,
                        router: str, layout: ShardLayout, lo: Tensor, hi: Tensor, group,
                        chunk: int = 0) -> Tensor:
    """The active heads of every query, int64 [B, S, h], the same on every rank."""
    if router == "qnorm":
        # The ablation router reads queries only, which every rank holds: no communication.
        scores = q.float().norm(dim=-1)
    else:
        scores = sharded_router_scores(q, k_local, w, block, layout, lo, hi, group, chunk)
    return torch.nan_to_num(scores, nan=NEG_INF).topk(active_heads, dim=-1).indices
