"""The MISA router's scoring kernels: pooled block keys and per-head router scores (the top-h
selection is launch/route_heads.py).

    kbar[b]  = mean of k over key block b (the last, partial block averages its valid keys);
               of the real keys k * k_scale when FP8 keys come with a per-key scale. From a
               paged cache, per sequence over its own keys [0, seq_len) (paging.py)
    r[t, j]  = |w[t, j]| * sum over blocks b visible to t of ReLU(q[t, j] . kbar[b])
    heads[t] = the h heads with the largest r[t, :]  (NaN ranks lowest; order unspecified)

The router costs H * ceil(T/B) dot products per query, under 1% of the dense indexer at B=1024,
so it favours accuracy: kbar stays fp32 and the dots use 3-pass tf32 (close to fp32), which keeps
near-tied heads in the reference's order. The router scores [B, S, H] are one matrix product
per sequence: each (query, head) pair is a row (q [S, H, D] read as [S * H, D]), the pooled keys
are the columns, and a program takes BLOCK_R pairs against every pooled key, so the keys are
read once per tile rather than once per head, and few queries (decode) still give H rows each."""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import wrap_triton
import triton
import triton.language as tl

from ..common import INTERPRET, MASK_BOOL, MASK_NONE, load_mask_tile, next_pow2, visible_range
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
    """(BLOCK_T keys read per step, num_warps) of pooled_keys: one program pools one block."""
    return (16, 1) if INTERPRET else (64, 4)


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
def router_scores_kernel(
    q_ptr, w_ptr, kbar_ptr, ks_ptr, ke_ptr, r_ptr, bv_ptr,
    queries, T, n_blocks, block, H,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_wb, stride_ws, stride_wh,
    stride_kb, stride_kn,
    stride_rb, stride_rs,
    stride_ob, stride_os,
    stride_vb, stride_vs, stride_vn,
    D,
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
    tl.store(r_ptr + b.to(tl.int64) * stride_ob + t.to(tl.int64) * stride_os + j, r,
             mask=pair_ok)


def router_tile(queries: int) -> tuple[int, int, int, int]:
    """(BLOCK_R (query, head) pairs, BLOCK_NB pooled keys, num_warps, num_stages) of
    router_scores."""
    if INTERPRET:
        return 16, 16, 1, 1
    # 64 rows, the smallest tile Hopper's warpgroup matrix instructions take whole. The 3-pass
    # tf32 dot stages both fp32 operands in shared memory twice (high and low parts); with 32
    # pooled keys a tile and one stage that is 96 KiB (sm_90 build), so two programs share an SM.
    return 64, 32, 4, 1


def router_scores(q: torch.Tensor, w: torch.Tensor, kbar: torch.Tensor, block_size: int, T: int,
                  causal: bool, key_start: Optional[torch.Tensor],
                  key_end: Optional[torch.Tensor],
                  blocks_seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 [B, S, H]: r[t, j] of every query and head, over the pooled keys kbar [B, n_blocks, D]
    (pooled_keys) of T key positions. blocks_seen [B, S, n_blocks] (block_visibility, uint8):
    with a mask, the blocks that hold a key the query sees."""
    batch, queries, num_heads, dim = q.shape
    n_blocks = kbar.shape[1]
    scores = torch.empty(batch, queries, num_heads, dtype=torch.float32, device=q.device)
    ragged = key_start is not None
    dummy = q
    rstr = (key_start.stride(0), key_start.stride(1)) if ragged else (0, 0)
    vstr = blocks_seen.stride() if blocks_seen is not None else (0, 0, 0)
    block_r, block_nb, warps, stages = router_tile(queries)
    grid = (triton.cdiv(queries * num_heads, block_r), batch)
    wrap_triton(router_scores_kernel)[grid](
        q, w, kbar, key_start if ragged else dummy, key_end if ragged else dummy, scores,
        blocks_seen if blocks_seen is not None else dummy,
        queries, T, n_blocks, block_size, num_heads,
        *q.stride(), *w.stride(), kbar.stride(0), kbar.stride(1), *rstr, scores.stride(0),
        scores.stride(1), *vstr, dim, CAUSAL=causal, RAGGED=ragged,
        BLOCK_MASK=MASK_NONE if blocks_seen is None else MASK_BOOL, BLOCK_R=block_r,
        BLOCK_NB=block_nb, BLOCK_D=max(16, next_pow2(dim)), num_warps=warps, num_stages=stages)
    return scores
