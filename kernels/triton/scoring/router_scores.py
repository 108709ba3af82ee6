"""The MISA router's kernels: pooled block keys, per-head router scores and, fused into the
scores kernel, each query's top-h heads.

    kbar[b]  = mean of k over key block b (the last, partial block averages its valid keys);
               of the real keys k * k_scale when FP8 keys come with a per-key scale. From a
               paged cache, per sequence over its own keys [0, seq_len) (paging.py)
    r[t, j]  = |w[t, j]| * sum over blocks b visible to t of ReLU(q[t, j] . kbar[b])
    heads[t] = the h heads with the largest r[t, :]  (NaN ranks lowest; among equal scores the
               lower head index wins; order unspecified)

The router costs H * ceil(T/B) dot products per query, under 1% of the dense indexer at B=1024,
so it favours accuracy: kbar stays fp32 and the dots use 3-pass tf32 (close to fp32), which keeps
near-tied heads in the reference's order. The router scores [B, S, H] are one matrix product
per sequence: each (query, head) pair is a row (q [S, H, D] read as [S * H, D]), the pooled keys
are the columns, and a program takes BLOCK_R pairs against every pooled key, so the keys are
read once per tile rather than once per head, and few queries (decode) still give H rows each.

When H is a power of two no larger than BLOCK_R (H = 32 and 64 with the GPU's 64-pair tile),
a program's pairs are whole queries, so the same program also picks their top-h heads (h rounds
of a max over each query's H scores) and writes only the heads [B, S, h] (router_top_heads): no
[B, S, H] scores and no second launch. Other H write the scores, and launch/route_heads.py
selects with candidate_topk, which breaks ties the same way."""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import wrap_triton
import triton
import triton.language as tl

from ..common import (INTERPRET, MASK_BOOL, MASK_NONE, load_mask_tile, next_pow2, ordered_key,
                      visible_range)
from ..paging import key_location



@triton.jit
def pooled_keys_kernel(k_ptr, kscale_ptr, table_ptr, len_ptr, first_ptr, out_ptr, T, block,
                       stride_kb, stride_kt, stride_kd, stride_sb, stride_st, stride_tb,
                       stride_ob, stride_on, D, HAS_KSCALE: tl.constexpr, PAGED: tl.constexpr,
                       PAGE: tl.constexpr, UPDATE: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    blk = tl.program_id(0)
    b = tl.program_id(1)
    start = blk * block
    n_keys = T
    if PAGED:
        # Each sequence has its own length: blocks past it pool nothing (they are not visible).
        n_keys = tl.load(len_ptr + b).to(tl.int32)
    end = tl.minimum(start + block, n_keys)
    keep = blk < 0  # False: the block is (re)computed
    if UPDATE:
        # Blocks wholly before the sequence's first new token keep the cached mean: no key is
        # read (an empty key range) and nothing is written.
        keep = blk < tl.load(first_ptr + b).to(tl.int32) // block
        end = tl.where(keep, start, end)
    d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(start, end, BLOCK_T):
        pos = s0 + tl.arange(0, BLOCK_T)
        outer, inner = key_location(b, pos.to(tl.int64), pos < end, table_ptr, stride_tb, PAGED,
                                    PAGE)
        x = tl.load(k_ptr + (outer * stride_kb + inner * stride_kt)[:, None]
                    + d[None, :] * stride_kd, mask=(pos < end)[:, None] & (d < D)[None, :],
                    other=0.0).to(tl.float32)
        if HAS_KSCALE:
            x = x * tl.load(kscale_ptr + outer * stride_sb + inner * stride_st,
                            mask=pos < end, other=0.0)[:, None]
        acc += tl.sum(x, axis=0)
    mean = acc / tl.maximum(end - start, 1).to(tl.float32)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + blk.to(tl.int64) * stride_on + d, mean,
             mask=(d < D) & ~keep)


def pooling_tile() -> tuple[int, int]:
    """(BLOCK_T keys read per step, num_warps) of pooled_keys: one program pools one block.
    256 keys by 8 warps keep more key bytes in flight per program than 64 by 4: the pooling
    is a pure read of every key, and a 1024-key block is then four steps instead of sixteen."""
    return (16, 1) if INTERPRET else (256, 8)


def pooled_keys(k: torch.Tensor, block: int, k_scale: Optional[torch.Tensor] = None,
                block_table: Optional[torch.Tensor] = None,
                seq_lens: Optional[torch.Tensor] = None,
                cached: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """k [B, T, D] (times k_scale [B, T] fp32 per key when given) -> fp32 [B, ceil(T/block), D].
    With block_table [B, pages] (unit column stride) and seq_lens [B]: k is a paged cache
    [P, page, D] (k_scale [P, page]), T = pages * page, and each sequence pools its keys
    [0, seq_len) only (its last partial block averages its valid keys; blocks past it are
    zero). cached = (pooled [B, n_blocks, D] fp32, first_token [B]), paged only: the result is
    `pooled` with the blocks from first_token // block on recomputed (the same program computes
    every block, so the result is bit for bit a full recompute where `pooled` was one)."""
    paged = block_table is not None
    page = k.shape[1] if paged else 1
    batch, T = (block_table.shape[0], block_table.shape[1] * page) if paged else k.shape[:2]
    dim = k.shape[2]
    n_blocks = triton.cdiv(T, block)
    if cached is None:
        out = torch.empty(batch, n_blocks, dim, dtype=torch.float32, device=k.device)
    else:
        out = cached[0].clone(memory_format=torch.contiguous_format)
    block_t, warps = pooling_tile()
    sstr = k_scale.stride() if k_scale is not None else (0, 0)
    wrap_triton(pooled_keys_kernel)[(n_blocks, batch)](
        k, k_scale if k_scale is not None else k, block_table if paged else k,
        seq_lens.contiguous() if paged else k,
        cached[1].contiguous() if cached is not None else k, out, T, block, *k.stride(), *sstr,
        block_table.stride(0) if paged else 0, out.stride(0), out.stride(1), dim,
        HAS_KSCALE=k_scale is not None, PAGED=paged, PAGE=page, UPDATE=cached is not None,
        BLOCK_T=block_t, BLOCK_D=max(16, next_pow2(dim)), num_warps=warps)
    return out


@triton.jit
def store_top_heads(r, query0, queries, active_heads, heads_ptr, stride_hs, H: tl.constexpr,
                    QUERIES: tl.constexpr):
    """heads_ptr[t, :active_heads] (int64) = the heads of the largest of r[t, :], for the QUERIES
    whole queries from query0 whose H NaN-free scores r holds in turn (head fastest): one round
    of a max per head written, the lower head index winning among equal scores (as in
    candidate_topk, which takes ties in lane order)."""
    keys = ordered_key(tl.reshape(r, [QUERIES, H]))
    head = tl.arange(0, H)[None, :]
    t = query0 + tl.arange(0, QUERIES)
    out = heads_ptr + t.to(tl.int64) * stride_hs
    for i in range(active_heads):
        best = tl.max(keys, axis=1)
        pick = tl.min(tl.where(keys == best[:, None], head, H), axis=1)
        tl.store(out + i, pick.to(tl.int64), mask=t < queries)
        # Key 0 lies below the key of every score, -inf included: a taken head never wins
        # again, so a query whose scores are all -inf still gets distinct heads.
        keys = tl.where(head == pick[:, None], 0, keys)


@triton.jit
def router_scores_kernel(
    q_ptr, w_ptr, kbar_ptr, ks_ptr, ke_ptr, out_ptr, bv_ptr,
    queries, T, n_blocks, block, active_heads,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_wb, stride_ws, stride_wh,
    stride_kb, stride_kn,
    stride_rb, stride_rs,
    stride_ob, stride_os,
    stride_vb, stride_vs, stride_vn,
    D,
    H: tl.constexpr, SELECT_HEADS: tl.constexpr,
    CAUSAL: tl.constexpr, RAGGED: tl.constexpr, BLOCK_MASK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_NB: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(1)
    # Rows are (query, head) pairs, head fastest: pair = t * H + j.
    pair = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    pair_ok = pair < queries * H
    t = pair // H
    j = pair % H
    lo, hi = visible_range(b, t, pair_ok, ks_ptr, ke_ptr, stride_rb, stride_rs, T, queries,
                           CAUSAL, RAGGED)
    # An empty range sees no block, not even the one holding lo (as the reference).
    has_keys = pair_ok & (lo < hi)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q_rows = (q_ptr + b.to(tl.int64) * stride_qb + t.to(tl.int64) * stride_qs
              + j.to(tl.int64) * stride_qh)
    q_tile = tl.load(q_rows[:, None] + d[None, :] * stride_qd,
                     mask=pair_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    r = tl.zeros([BLOCK_R], dtype=tl.float32)
    for nb0 in range(0, n_blocks, BLOCK_NB):
        blocks = nb0 + tl.arange(0, BLOCK_NB)
        kbar = tl.load(kbar_ptr + b.to(tl.int64) * stride_kb + blocks[:, None] * stride_kn
                       + d[None, :], mask=(blocks < n_blocks)[:, None] & d_ok[None, :],
                       other=0.0)
        per_block = tl.dot(q_tile, tl.trans(kbar), input_precision="tf32x3")
        first = blocks * block
        visible = ((first[None, :] < hi[:, None]) & (first[None, :] + block > lo[:, None])
                   & (blocks < n_blocks)[None, :] & has_keys[:, None])
        # With a mask, the blocks that hold a key the query sees (block_visibility.py).
        visible, _ = load_mask_tile(bv_ptr, b, t[:, None], blocks[None, :], visible,
                                    stride_vb, stride_vs, stride_vn, BLOCK_MASK)
        relu = tl.maximum(per_block, 0.0, propagate_nan=tl.PropagateNan.ALL)
        r += tl.sum(tl.where(visible, relu, 0.0), axis=1)
    w = tl.load(w_ptr + b.to(tl.int64) * stride_wb + t.to(tl.int64) * stride_ws
                + j.to(tl.int64) * stride_wh, mask=pair_ok, other=0.0).to(tl.float32)
    r = tl.abs(w) * r
    r = tl.where(r == r, r, float("-inf"))
    if SELECT_HEADS:
        # The tile's pairs are BLOCK_R // H whole queries (selects_heads), so their heads are
        # picked here and only the heads are written.
        store_top_heads(r, tl.program_id(0) * (BLOCK_R // H), queries, active_heads,
                        out_ptr + b.to(tl.int64) * stride_ob, stride_os, H, BLOCK_R // H)
    else:
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + t.to(tl.int64) * stride_os + j, r,
                 mask=pair_ok)


def router_tile(queries: int, num_heads: int) -> tuple[int, int, int, int]:
    """(BLOCK_R (query, head) pairs, BLOCK_NB pooled keys, num_warps, num_stages) of
    router_scores_kernel."""
    if INTERPRET:
        # Few pairs keep the interpreter fast; but as many as H, up to the GPU's 64, so that a
        # tile holds whole queries and selects their heads where the GPU's does.
        return min(64, max(16, next_pow2(num_heads))), 16, 1, 1
    # 64 rows, the smallest tile Hopper's warpgroup matrix instructions take whole. The 3-pass
    # tf32 dot stages both fp32 operands in shared memory twice (high and low parts); with 32
    # pooled keys a tile and one stage that is 96 KiB (sm_90 build), so two programs share an SM.
    return 64, 32, 4, 1


def selects_heads(queries: int, num_heads: int) -> bool:
    """Whether router_top_heads takes these heads: its tiles must hold whole queries, so H is a
    power of two no larger than BLOCK_R (H = 32 and 64 on the GPU)."""
    return (num_heads & (num_heads - 1) == 0
            and num_heads <= router_tile(queries, num_heads)[0])


def _launch(q: torch.Tensor, w: torch.Tensor, kbar: torch.Tensor, block_size: int, T: int,
            causal: bool, key_start: Optional[torch.Tensor], key_end: Optional[torch.Tensor],
            blocks_seen: Optional[torch.Tensor], out: torch.Tensor, active_heads: int):
    """router_scores_kernel writing `out`: the scores [B, S, H] (active_heads 0) or the top
    active_heads heads [B, S, active_heads]."""
    batch, queries, num_heads, dim = q.shape
    n_blocks = kbar.shape[1]
    ragged = key_start is not None
    dummy = q
    rstr = (key_start.stride(0), key_start.stride(1)) if ragged else (0, 0)
    vstr = blocks_seen.stride() if blocks_seen is not None else (0, 0, 0)
    block_r, block_nb, warps, stages = router_tile(queries, num_heads)
    grid = (triton.cdiv(queries * num_heads, block_r), batch)
    wrap_triton(router_scores_kernel)[grid](
        q, w, kbar, key_start if ragged else dummy, key_end if ragged else dummy, out,
        blocks_seen if blocks_seen is not None else dummy,
        queries, T, n_blocks, block_size, active_heads,
        *q.stride(), *w.stride(), kbar.stride(0), kbar.stride(1), *rstr, out.stride(0),
        out.stride(1), *vstr, dim, H=num_heads, SELECT_HEADS=active_heads > 0, CAUSAL=causal,
        RAGGED=ragged, BLOCK_MASK=MASK_NONE if blocks_seen is None else MASK_BOOL,
        BLOCK_R=block_r, BLOCK_NB=block_nb, BLOCK_D=max(16, next_pow2(dim)), num_warps=warps,
        num_stages=stages)


def router_scores(q: torch.Tensor, w: torch.Tensor, kbar: torch.Tensor, block_size: int, T: int,
                  causal: bool, key_start: Optional[torch.Tensor],
                  key_end: Optional[torch.Tensor],
                  blocks_seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 [B, S, H]: r[t, j] of every query and head (NaN as -inf), over the pooled keys kbar
    [B, n_blocks, D] (pooled_keys) of T key positions. blocks_seen [B, S, n_blocks]
    (block_visibility, uint8): with a mask, the blocks that hold a key the query sees."""
    batch, queries, num_heads, _ = q.shape
    scores = torch.empty(batch, queries, num_heads, dtype=torch.float32, device=q.device)
    _launch(q, w, kbar, block_size, T, causal, key_start, key_end, blocks_seen, scores, 0)
    return scores


def router_top_heads(q: torch.Tensor, w: torch.Tensor, kbar: torch.Tensor, block_size: int,
                     T: int, causal: bool, key_start: Optional[torch.Tensor],
                     key_end: Optional[torch.Tensor], blocks_seen: Optional[torch.Tensor],
                     active_heads: int) -> torch.Tensor:
    """int64 [B, S, active_heads]: the heads of each query's largest router scores (those of
    router_scores, selected in the same kernel; ties go to the lower head index, NaN ranks
    lowest; order unspecified), where selects_heads holds."""
    batch, queries, num_heads, _ = q.shape
    assert 0 < active_heads <= num_heads and selects_heads(queries, num_heads)
    heads = torch.empty(batch, queries, active_heads, dtype=torch.int64, device=q.device)
    _launch(q, w, kbar, block_size, T, causal, key_start, key_end, blocks_seen, heads,
            active_heads)
    return heads
