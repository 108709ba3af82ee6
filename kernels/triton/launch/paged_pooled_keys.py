"""misa::paged_pooled_keys on the GPU: the router's block means of a paged key cache
(scoring/router_scores.py's pooled_keys reading the pages in place), in full or as an update of a
cached tensor that recomputes only the blocks from each sequence's first new token on."""
from __future__ import annotations

from typing import Optional

import torch

from ..scoring.router_scores import pooled_keys
from .paged_decode_topk import checked_paging


def paged_pooled_keys_op(k_cache: torch.Tensor, block_table: torch.Tensor,
                         seq_lens: torch.Tensor, block_size: int,
                         k_scale: Optional[torch.Tensor] = None,
                         pooled: Optional[torch.Tensor] = None,
                         first_token: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The op (inputs validated by the caller): fp32 [B, ceil(pages * page / block_size), D].
    Lengths, used page ids and first tokens out of range are clamped on the device before any
    key is read, and the blocks of a sequence with such a length, page or k_scale entry are NaN
    (paged_decode_topk then poisons that sequence's selection itself)."""
    block_table, lengths, faults = checked_paging(k_cache, block_table, seq_lens, k_scale)
    cached = None
    if pooled is not None:
        capacity = block_table.shape[1] * k_cache.shape[1]
        cached = (pooled.float(), first_token.clamp(0, capacity))
    out = pooled_keys(k_cache, block_size, k_scale, block_table.contiguous(),
                      lengths.contiguous(), cached)
    return out.masked_fill(faults[:, None, None], float("nan"))
