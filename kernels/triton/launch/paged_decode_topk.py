"""misa::paged_decode_topk on the GPU: per-query scores of each sequence's keys, read straight
from their pages, then the top-k of the score rows. Nothing copies the pages into contiguous
keys: decode is bound by key reads, and a gather would read and write every key once more.

One scoring launch (decode_scores) does the q_scale fold and check and, for MISA with up to 64
heads, the routing, over the cached pooled keys or pooled keys computed here: MISA decode then
issues the launches dense decode does. MISA past 64 heads takes the unpaged decode path's steps
(route_heads, routed_inputs, query_scores)."""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import wrap_triton

from ..common import INTERPRET, next_pow2
from ..paging import checked_paging_kernel
from ..scoring.query_scores import query_scores
from ..scoring.routed_inputs import routed_inputs
from ..scoring.decode_scores import MAX_HEADS as DECODE_ROUTER_MAX_HEADS, decode_scores
from ..scoring.router_scores import pooled_keys as pooled
from .route_heads import route_heads
from ..selection.row_topk import topk_rows
from .device_checks import either, fold_query_scale, poison_selection


def paged_decode_topk(q: torch.Tensor, k_cache: torch.Tensor, w: torch.Tensor,
                      block_table: torch.Tensor, seq_lens: torch.Tensor, k_top: int,
                      active_heads: int, block_size: int, scale: float,
                      q_scale: Optional[torch.Tensor] = None,
                      k_scale: Optional[torch.Tensor] = None,
                      pooled_keys: Optional[torch.Tensor] = None
                      ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(values fp32, indices int64) [B, min(k_top, pages * page)], unordered, and the faults
    [B] of the queries (a q_scale [B, H] row with an entry not finite and > 0, or, past 64
    heads, a routed head id outside [0, H), which route_heads does not produce; None when
    neither can occur). q [B, H, D], w [B, H], k_cache [P, page, D], q_scale [B, H], k_scale [P, page].
    pooled_keys: the router's cached block means (paged_pooled_keys), so it reads no key."""
    batch = q.shape[0]
    T = block_table.shape[1] * k_cache.shape[1]
    # The kernels read the table rows and the lengths with unit strides, and the key ranges
    # built from seq_lens must share one layout (start and end are read with the same strides).
    block_table, seq_lens = block_table.contiguous(), seq_lens.contiguous()
    K = min(k_top, T)
    scores = torch.empty(batch, 1, T, dtype=torch.float32, device=q.device)
    if q.shape[1] <= DECODE_ROUTER_MAX_HEADS or not active_heads:
        # One scoring launch: for MISA the kernel routes its own query, and it folds and checks
        # q_scale itself.
        if active_heads and pooled_keys is None:
            pooled_keys = pooled(k_cache, block_size, k_scale, block_table, seq_lens)
        faults = decode_scores(q, k_cache, w, seq_lens, scores[:, 0], scale=scale,
                               active_heads=active_heads, pooled=pooled_keys,
                               block_size=block_size, q_scale=q_scale, k_scale=k_scale,
                               block_table=block_table)
    else:
        q, w = q[:, None], w[:, None]
        q_scale = None if q_scale is None else q_scale[:, None]
        key_end = seq_lens.view(batch, 1)
        vis = dict(causal=False, key_start=torch.zeros_like(key_end), key_end=key_end)
        # The router weighs all H heads: it takes the folded w of every head.
        heads = route_heads(q, k_cache, fold_query_scale(w, q_scale), active_heads, block_size,
                            **vis, k_scale=k_scale, block_table=block_table, seq_lens=seq_lens,
                            kbar=pooled_keys)
        q, w, faults = routed_inputs(q, w, heads, q_scale)
        query_scores(q, k_cache, w, scores, rows=1, row0=0, scale=scale, k_scale=k_scale,
                     block_table=block_table, **vis)
        faults = faults[:, 0]
    values = torch.empty(batch, 1, K, dtype=torch.float32, device=q.device)
    indices = torch.empty(batch, 1, K, dtype=torch.int64, device=q.device)
    # -inf tail entries point past the sequence's end: hidden keys, as in the unpaged ops.
    topk_rows(scores, K, values, indices, tail_base=seq_lens.long())
    return values[:, 0], indices[:, 0], faults


def paged_decode_topk_op(q, k_cache, w, block_table, seq_lens, k_top, active_heads, block_size,
                         scale, q_scale=None, k_scale=None, pooled_keys=None):
    """The op (inputs validated by the caller). Lengths outside [0, pages * page] and page ids
    of used pages outside [0, P) are clamped before any kernel reads them, and their sequence's
    row is poisoned (values NaN, indices -1), as is a row with a bad scale."""
    block_table, lengths, faults = checked_paging(k_cache, block_table, seq_lens, k_scale)
    values, indices, query_faults = paged_decode_topk(
        q, k_cache, w, block_table, lengths, k_top, active_heads, block_size, scale,
        q_scale=q_scale, k_scale=k_scale, pooled_keys=pooled_keys)
    return poison_selection(values, indices, either(faults, query_faults))


def checked_paging(k_cache, block_table, seq_lens, k_scale=None):
    """(block_table, seq_lens, faults [B]) with lengths clamped into [0, pages * page] and the
    page ids clamped into [0, P), on the device in one launch (paging.checked_paging_kernel),
    which also checks k_scale [P, page] where keys are visible: faults marks the sequences whose
    length or used pages were out of range, or one of whose keys [0, seq_len) has a scale that
    is not finite and > 0."""
    num_pages, page = k_cache.shape[:2]
    batch, pages = block_table.shape
    block_table = block_table.contiguous()  # the kernel reads a row with unit stride
    table = torch.empty(batch, pages, dtype=block_table.dtype, device=block_table.device)
    lengths = torch.empty(batch, dtype=seq_lens.dtype, device=seq_lens.device)
    faults = torch.empty(batch, dtype=torch.int8, device=seq_lens.device)
    slots = next_pow2(page)
    scale = faults if k_scale is None else k_scale  # (a placeholder the kernel never reads)
    wrap_triton(checked_paging_kernel)[(batch,)](
        block_table, seq_lens, table, lengths, faults, scale, pages, num_pages,
        block_table.stride(0), table.stride(0), scale.stride(0), scale.stride(-1), PAGE=page,
        BLOCK=min(1024, next_pow2(pages)), HAS_SCALE=k_scale is not None,
        SCALE_PAGES=max(1, 2048 // slots), SCALE_SLOTS=slots, num_warps=1 if INTERPRET else 4)
    faults = faults.bool()
    return table, lengths, faults
