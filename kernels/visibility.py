"""Which keys each query may see, for a chunk of queries.

Visibility is the AND of (a) end-aligned causality (query i of S sees keys [0, T-S+i]) when
`causal`, (b) a ragged range [key_start, key_end) when given, and (c) a boolean mask (True =
visible) when given. A float mask is additive: it is added to the score, and a bias at or below
HIDDEN_BIAS (-inf, the dtypes' finfo.min) hides a key. A mask may have any shape that broadcasts
to [B, S, T] (it is expanded, a view)."""
from __future__ import annotations

from typing import Optional

import torch

HIDDEN_BIAS = torch.finfo(torch.float16).min


def chunk_visibility(
    rows: slice,
    batch: int,
    queries: int,
    keys: int,
    device: torch.device,
    causal: bool,
    key_start: Optional[torch.Tensor],
    key_end: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Returns (visible bool [B, c, T], additive bias float32 [B, c, T] or None) for query rows."""
    positions = torch.arange(keys, device=device)
    query_ids = torch.arange(queries, device=device)[rows]
    visible = torch.ones(batch, query_ids.numel(), keys, dtype=torch.bool, device=device)
    if causal:
        last_visible = keys - queries + query_ids
        visible &= positions[None, None, :] <= last_visible[None, :, None]
    if key_start is not None:
        visible &= positions >= key_start[:, rows, None].to(positions.dtype)
        visible &= positions < key_end[:, rows, None].to(positions.dtype)
    bias = None
    if mask is not None:
        mask = mask.expand(batch, queries, keys)
        if mask.dtype == torch.bool:
            visible &= mask[:, rows]
        else:
            bias = mask[:, rows].float()
            visible &= bias > HIDDEN_BIAS
    return visible, bias


def block_visibility(visible: torch.Tensor, block: int) -> torch.Tensor:
    """[B, c, T] key visibility -> [B, c, ceil(T/block)]: a block is visible if any key in it is."""
    keys = visible.shape[-1]
    num_blocks = -(-keys // block)
    padded = torch.nn.functional.pad(visible, (0, num_blocks * block - keys), value=False)
    return padded.view(*visible.shape[:-1], num_blocks, block).any(-1)


def pooled_keys(k: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of k [B, T, D] over blocks of `block` keys -> [B, ceil(T/block), D] float32. The last,
    partial block averages only its valid keys."""
    batch, keys, dim = k.shape
    num_blocks = -(-keys // block)
    padded = torch.nn.functional.pad(k.float(), (0, 0, 0, num_blocks * block - keys))
    sums = padded.view(batch, num_blocks, block, dim).sum(2)
    # Built without writing a Python number into a tensor: traced (AOTInductor packaging), such a
    # write becomes a tensor constant that torch.export cannot lift.
    counts = (keys - torch.arange(num_blocks, device=k.device) * block).clamp(max=block)
    return sums / counts.float()[None, :, None]
