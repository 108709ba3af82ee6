"""misa::paged_decode_topk on the GPU: per-query scores of each sequence's keys, read straight
from their pages, then the top-k of the score rows. Nothing copies the pages into contiguous
keys: decode is bound by key reads, and a gather would read and write every key once more.
MISA routes first (route_heads over the cached or computed pooled keys, routed_inputs), then
scores its routed heads with the same kernel."""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import wrap_triton
import triton

from ..common import INTERPRET, next_pow2
from ..paging import checked_paging_kernel
from ..scoring.query_scores import query_scores
from ..scoring.routed_inputs import routed_inputs
from .route_heads import route_heads
from ..selection.row_topk import topk_rows
from .device_checks import either, fold_query_scale, poison_selection, scale_faults


def paged_decode_topk(q: torch.Tensor, k_cache: torch.Tensor, w: torch.Tensor,
                      block_table: torch.Tensor, seq_lens: torch.Tensor, k_top: int,
                      active_heads: int, block_size: int, scale: float,
                      q_scale: Optional[torch.Tensor] = None,
                      k_scale: Optional[torch.Tensor] = None,
                      pooled_keys: Optional[torch.Tensor] = None
                      ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(values fp32, indices int64) [B, min(k_top, pages * page)], unordered, and the faults
    [B] of the queries (a q_scale [B, H] row with an entry not finite and > 0, or a routed head
    id outside [0, H), which route_heads does not produce; None with neither q_scale nor
    routing). q [B, H, D], w [B, H], k_cache [P, page, D], q_scale [B, H], k_scale [P, page].
    pooled_keys: the router's cached block means (paged_pooled_keys), so it reads no key."""
    batch = q.shape[0]
    T = block_table.shape[1] * k_cache.shape[1]
    # The kernels read the table rows and the lengths with unit strides, and the key ranges
    # built from seq_lens must share one layout (start and end are read with the same strides).
    block_table, seq_lens = block_table.contiguous(), seq_lens.contiguous()
    K = min(k_top, T)
    q, w = q[:, None], w[:, None]
    q_scale = None if q_scale is None else q_scale[:, None]
    key_end = seq_lens.view(batch, 1)
    vis = dict(causal=False, key_start=torch.zeros_like(key_end), key_end=key_end)
    if active_heads:
        # The router weighs all H heads: it takes the folded w of every head.
        heads = route_heads(q, k_cache, fold_query_scale(w, q_scale), active_heads, block_size,
                            **vis, k_scale=k_scale, block_table=block_table, seq_lens=seq_lens,
                            kbar=pooled_keys)
        q, w, faults = routed_inputs(q, w, heads, q_scale)
        faults = faults[:, 0]
    else:
        w = fold_query_scale(w, q_scale)
        faults = None if q_scale is None else scale_faults(q_scale, None)[:, 0]
    scores = torch.empty(batch, 1, T, dtype=torch.float32, device=q.device)
    query_scores(q, k_cache, w, scores, rows=1, row0=0, scale=scale, k_scale=k_scale,
                 block_table=block_table, **vis)
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


# Programs that spread the scale check over the card (132 SMs on an H100/H200).
SCALE_CHECK_PROGRAMS = 1024


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
    slots = next_pow2(page)
    # Scale tiles of 2048 entries (16 under the interpreter, so that its tests split the pages).
    scale_pages = max(1, (16 if INTERPRET else 2048) // slots)
    splits = 1
    if k_scale is not None:
        splits = min(triton.cdiv(SCALE_CHECK_PROGRAMS, batch), triton.cdiv(pages, scale_pages))
    pages_per_split = triton.cdiv(triton.cdiv(pages, splits), scale_pages) * scale_pages
    splits = triton.cdiv(pages, pages_per_split)
    flags = torch.empty(batch, splits, dtype=torch.int8, device=seq_lens.device)
    scale = flags if k_scale is None else k_scale  # (a placeholder the kernel never reads)
    wrap_triton(checked_paging_kernel)[(batch, splits)](
        block_table, seq_lens, table, lengths, flags, scale, pages, num_pages, pages_per_split,
        block_table.stride(0), table.stride(0), scale.stride(0), scale.stride(-1), PAGE=page,
        BLOCK=min(1024, next_pow2(pages)), HAS_SCALE=k_scale is not None,
        SCALE_PAGES=scale_pages, SCALE_SLOTS=slots, num_warps=1 if INTERPRET else 4)
    return table, lengths, flags.any(-1)
