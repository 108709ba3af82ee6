"""Turning per-rank selections into global ones.

`merge_topk`: every rank's best `width` (value, global index) pairs are all-gathered in one packed
int32 tensor (value bits + index, 8 bytes a pair) and every rank takes the top `width` of the
W*width candidates: the same answer as a top-k over all keys, since each key's rank-local top-k
contains every key of the global top-k that it holds.

`global_top_members`: for the hierarchical variant each rank only needs to know WHICH of its own
candidates are among the global top-n, not the others' indices, so only values travel (4 bytes a
candidate); ties at the threshold are handed out in rank order, so exactly n entries are kept."""
from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.torch_impl import NEG_INF
from .collectives import all_gather_stacked


def pad_selection(values: Tensor, indices: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Pads [B, S, w <= width] selections to `width` with -inf values and index 0 (a valid key
    index, meaningless like every -inf entry's)."""
    missing = width - values.shape[-1]
    if missing == 0:
        return values, indices
    values = torch.nn.functional.pad(values, (0, missing), value=NEG_INF)
    indices = torch.nn.functional.pad(indices, (0, missing), value=0)
    return values, indices


def empty_selection(batch: int, queries: int, width: int, device) -> tuple[Tensor, Tensor]:
    values = torch.full((batch, queries, width), NEG_INF, dtype=torch.float32, device=device)
    return values, torch.zeros(batch, queries, width, dtype=torch.int64, device=device)


def merge_topk(values: Tensor, global_indices: Tensor, width: int, group, step: str
               ) -> tuple[Tensor, Tensor]:
    """Global top-`width` from each rank's [B, S, width] (values float32, global indices).
    Collective; returns (values float32, indices int64) [B, S, width], the same on every rank."""
    batch, queries, _ = values.shape
    packed = torch.stack([values.float().contiguous().view(torch.int32),
                          global_indices.to(torch.int32)], dim=-1)
    gathered = all_gather_stacked(packed, group, step)  # [W, B, S, width, 2]
    every_value = gathered[..., 0].contiguous().view(torch.float32)
    every_index = gathered[..., 1]
    every_value = every_value.permute(1, 2, 0, 3).reshape(batch, queries, -1)
    every_index = every_index.permute(1, 2, 0, 3).reshape(batch, queries, -1)
    best, slot = every_value.topk(width, dim=-1)
    return best, every_index.gather(-1, slot).long()


def global_top_members(values: Tensor, keep: int, rank: int, group, step: str) -> Tensor:
    """bool [B, S, n]: which of this rank's candidate values [B, S, n] are among the `keep`
    largest over all ranks (finite values only). `keep` <= W*n. Collective."""
    gathered = all_gather_stacked(values.float(), group, step)  # [W, B, S, n]
    batch, queries, _ = values.shape
    flat = gathered.permute(1, 2, 0, 3).reshape(batch, queries, -1)
    threshold = flat.topk(keep, dim=-1).values[..., -1:]  # the keep-th largest, [B, S, 1]
    above = gathered > threshold
    tied = gathered == threshold
    free_slots = keep - above.sum(dim=(0, 3))  # [B, S]: places left for values == threshold
    tied_below_rank = tied[:rank].sum(dim=(0, 3))
    own_tied = tied[rank]
    tie_order = own_tied.cumsum(-1) + tied_below_rank[..., None]
    taken_ties = own_tied & (tie_order <= free_slots[..., None])
    return (above[rank] | taken_ties) & torch.isfinite(values)


def compact_candidates(members: Tensor, local_indices: Tensor) -> Tensor:
    """[B, S, c] local key indices of the members (c = the most any query keeps), -1 padding."""
    width = int(members.sum(-1).max()) if members.numel() else 0
    if width == 0:
        return local_indices.new_empty(members.shape[:-1] + (0,))
    slots = members.to(torch.int8).topk(width, dim=-1).indices
    kept = members.gather(-1, slots)
    return torch.where(kept, local_indices.gather(-1, slots), -1)
