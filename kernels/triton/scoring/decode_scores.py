"""Decode scoring, one query per sequence against its keys [0, seq_len) (paged or contiguous),
with everything the decode op did around it in other launches folded into the program:

- MISA (ROUTE): each program runs the router for its sequence's query over the pooled keys (H
  heads x ceil(T / block) block means, router_scores.router_row_scores), picks the top-h heads
  (router_scores.pick_top_head: ties to the lower head index, NaN as -inf) and loads q and w of
  those heads through the ids; dense scores every head.
- q_scale [B, H]: the weights are w * q_scale (the router weighs every head by it, the scoring
  its own heads), and the first program of each sequence flags the query when an entry of its
  q_scale row is not finite and > 0 (device_checks.scale_faults' rule); the caller poisons that
  row.

Then each program walks its share of the keys as query_scores does (query_scores.score_key_run).

Decode is bound by key reads, and the 8 routed heads read the same keys as 64: what MISA saves
there is math, not bytes, so its separate launches (the router, the gather of the routed q and
w, the q_scale fold and check) were the whole difference from dense decode. Here they cost no
launch: the router's work per program is one [H, D] x [D, 32] product per 32 pooled blocks (64 x
64 x 128 at 64K keys and blocks of 1024), repeated by the few programs that share a query, and
its heads are the ones route_heads picks (the same products in the same order, the same ties)."""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import wrap_triton
import triton
import triton.language as tl

from ..common import INTERPRET, MASK_NONE, dot_block_d, dot_config, next_pow2, ordered_key
from .query_scores import load_query_heads, programs_per_query, query_tile, score_key_run
from .router_scores import pick_top_head, router_row_scores, router_tile

# The router's [H, D] fp32 query tile stays in registers beside the scoring loop's: up to 64
# heads (DeepSeek-V3.2 and GLM-5 indexers have 64 or 32). More heads route in their own kernel.
MAX_HEADS = 64
# Decode has no mask (a global read inside a kernel must be a constexpr).
NO_MASK = tl.constexpr(MASK_NONE)


@triton.jit
def decode_scores_kernel(
    q_ptr, w_ptr, qscale_ptr, kbar_ptr, len_ptr, k_ptr, out_ptr, kscale_ptr, table_ptr,
    fault_ptr, T, n_cols, n_blocks, block, H, active_heads, scale, cols_per_program,
    stride_qb, stride_qh, stride_qd,
    stride_wb, stride_wh,
    stride_qsb, stride_qsh,
    stride_pb, stride_pn,
    stride_kb, stride_kt, stride_kd,
    stride_ob,
    stride_sb, stride_st, stride_tb,
    D,
    ROUTE: tl.constexpr, HAS_QSCALE: tl.constexpr, HAS_KSCALE: tl.constexpr,
    PAGED: tl.constexpr, PAGE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    ROUTER_H: tl.constexpr, ROUTER_D: tl.constexpr, BLOCK_NB: tl.constexpr,
    BLOCK_HS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """ROUTER_H: H padded to a power of two (the router's tile rows, the q_scale check's
    width); BLOCK_HS: the head slots scored (h routed or H, padded to 16 at least)."""
    b = tl.program_id(0)
    pid_n = tl.program_id(1)
    col_start = pid_n * cols_per_program
    col_end = tl.minimum(col_start + cols_per_program, n_cols)
    q_row = q_ptr + b.to(tl.int64) * stride_qb
    w_row = w_ptr + b.to(tl.int64) * stride_wb
    scale_row = qscale_ptr + b.to(tl.int64) * stride_qsb
    # The query sees its sequence's keys [0, seq_len) (lengths already clamped into [0, T]).
    lo = tl.zeros((), dtype=tl.int32)
    hi = tl.minimum(tl.load(len_ptr + b).to(tl.int32), T)

    if HAS_QSCALE and pid_n == 0:
        every = tl.arange(0, ROUTER_H)
        s_row = tl.load(scale_row + every.to(tl.int64) * stride_qsh, mask=every < H, other=1.0)
        # NaN fails `> 0`, -inf too, +inf fails `< inf`.
        wrong = (every < H) & ~((s_row > 0.0) & (s_row < float("inf")))
        tl.store(fault_ptr + b, tl.max(wrong.to(tl.int32), axis=0) > 0)
    slots = tl.arange(0, BLOCK_HS)
    if ROUTE:
        ids = route_query(q_row, w_row, scale_row, kbar_ptr + b.to(tl.int64) * stride_pb, lo, hi,
                          H, active_heads, n_blocks, block, stride_qh, stride_qd, stride_wh,
                          stride_qsh, stride_pn, D, HAS_QSCALE, ROUTER_H, ROUTER_D, BLOCK_NB,
                          BLOCK_HS)
        slot_ok = slots < active_heads
    else:
        ids = slots
        slot_ok = slots < H

    # The query_scores walk, with q and w loaded through the ids.
    q_t, w = load_query_heads(q_row, w_row, ids, slot_ok, stride_qh, stride_qd, stride_wh, D,
                              DOT_DTYPE, BLOCK_D)
    if HAS_QSCALE:
        w = w * tl.load(scale_row + ids.to(tl.int64) * stride_qsh, mask=slot_ok, other=1.0)
    score_key_run(q_t, w, k_ptr, k_ptr, out_ptr + b.to(tl.int64) * stride_ob, kscale_ptr,
                  table_ptr, k_ptr, b, 0, 0, lo, hi, col_start, col_end, T, scale,
                  stride_kb, stride_kt, stride_kd, 0, 0, 0, stride_sb, stride_st, stride_tb,
                  0, 0, 0, D, False, HAS_KSCALE, PAGED, PAGE, NO_MASK, DOT_DTYPE, PRECISION,
                  BLOCK_N, BLOCK_D)


@triton.jit
def route_query(q_row, w_row, scale_row, kbar_row, lo, hi, H, active_heads, n_blocks, block,
                stride_qh, stride_qd, stride_wh, stride_qsh, stride_pn, D,
                HAS_QSCALE: tl.constexpr, ROUTER_H: tl.constexpr, ROUTER_D: tl.constexpr,
                BLOCK_NB: tl.constexpr, BLOCK_HS: tl.constexpr):
    """int32 [BLOCK_HS]: the query's top-active_heads heads (slots past them 0) by the router
    over its pooled keys kbar_row [n_blocks, D], which it sees through [lo, hi)."""
    # Every head; rows past H are padding.
    heads = tl.arange(0, ROUTER_H)
    head_ok = heads < H
    d = tl.arange(0, ROUTER_D)
    q_all = tl.load(q_row + heads[:, None].to(tl.int64) * stride_qh + d[None, :] * stride_qd,
                    mask=head_ok[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
    w_all = tl.load(w_row + heads.to(tl.int64) * stride_wh, mask=head_ok,
                    other=0.0).to(tl.float32)
    if HAS_QSCALE:
        # The fold, in fp32 as device_checks.fold_query_scale.
        w_all = w_all * tl.load(scale_row + heads.to(tl.int64) * stride_qsh, mask=head_ok,
                                other=1.0)
    zero = tl.zeros([ROUTER_H], dtype=tl.int32)
    r = router_row_scores(q_all, w_all, kbar_row, stride_pn, n_blocks, block, zero + lo,
                          zero + hi, head_ok & (lo < hi), kbar_row, 0, zero, 0, 0, 0, D,
                          NO_MASK, BLOCK_NB, ROUTER_D)
    # Padding heads take key 0, below every real score: they are never picked.
    keys = tl.where(head_ok, ordered_key(r), 0)[None, :]
    slots = tl.arange(0, BLOCK_HS)
    ids = tl.zeros([1, BLOCK_HS], dtype=tl.int32)
    for i in range(active_heads):
        pick, keys = pick_top_head(keys, heads[None, :], H)
        ids = tl.where(slots[None, :] == i, pick[:, None], ids)
    return tl.reshape(ids, [BLOCK_HS])


def router_rows(num_heads: int) -> int:
    """Rows of the router's query tile: H padded to 64 on the GPU, the tile of Hopper's
    warpgroup matrix instructions (a 32-row tile took 255 registers and spilled in the sm_90
    build, the 64-row one 215 without spilling)."""
    return max(16 if INTERPRET else 64, next_pow2(num_heads))


def decode_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, seq_lens: torch.Tensor,
                  out: torch.Tensor, *, scale: float, active_heads: int = 0,
                  pooled: Optional[torch.Tensor] = None, block_size: int = 0,
                  q_scale: Optional[torch.Tensor] = None,
                  k_scale: Optional[torch.Tensor] = None,
                  block_table: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """out [B, n_cols] fp32 (unit column stride) <- the scores of each sequence's decode query
    (q [B, H, D], w [B, H]) against its keys [0, seq_lens[b]) of k ([B, T, D], or a paged cache
    [P, page, D] with block_table [B, pages]); -inf past them. Dense over every head when
    active_heads is 0; else over its top-active_heads heads (H <= MAX_HEADS) by the router
    over pooled [B, ceil(T / block_size), D] fp32 (router_scores.pooled_keys). q_scale [B, H]
    fp32 scales w; k_scale as in query_scores. Returns the faults [B] bool (a bad q_scale
    row) with q_scale, else None."""
    batch, num_heads, dim = q.shape
    route = active_heads > 0
    assert not route or (active_heads <= num_heads <= MAX_HEADS and pooled is not None)
    assert out.stride(-1) == 1
    paged = block_table is not None
    page = k.shape[1] if paged else 1
    T = block_table.shape[1] * page if paged else k.shape[1]
    n_cols = out.shape[-1]
    dot_dtype, precision = dot_config(q, k)
    block_hs = max(16, next_pow2(active_heads if route else num_heads))
    block_n, warps, stages = query_tile(block_hs, k.element_size(), gathered=False)
    parts = programs_per_query(n_cols, block_n, batch)
    cols_per_program = triton.cdiv(triton.cdiv(n_cols, parts), block_n) * block_n
    faults = (torch.empty(batch, dtype=torch.bool, device=q.device) if q_scale is not None
              else None)
    sstr = k_scale.stride() if k_scale is not None else (0, 0)
    qsstr = q_scale.stride() if q_scale is not None else (0, 0)
    pstr = pooled.stride()[:2] if route else (0, 0)
    wrap_triton(decode_scores_kernel)[(batch, triton.cdiv(n_cols, cols_per_program))](
        q, w, q_scale if q_scale is not None else w, pooled if route else q, seq_lens, k, out,
        k_scale if k_scale is not None else k, block_table if paged else k,
        faults if faults is not None else out, T, n_cols, pooled.shape[1] if route else 0,
        block_size, num_heads, active_heads, float(scale), cols_per_program,
        *q.stride(), *w.stride(), *qsstr, *pstr, *k.stride(), out.stride(0), *sstr,
        block_table.stride(0) if paged else 0, dim,
        ROUTE=route, HAS_QSCALE=q_scale is not None, HAS_KSCALE=k_scale is not None,
        PAGED=paged, PAGE=page, DOT_DTYPE=dot_dtype, PRECISION=precision,
        ROUTER_H=router_rows(num_heads) if route else next_pow2(num_heads),
        ROUTER_D=max(16, next_pow2(dim)), BLOCK_NB=router_tile(1, num_heads)[1],
        BLOCK_HS=block_hs, BLOCK_N=block_n, BLOCK_D=dot_block_d(dim, dot_dtype),
        num_warps=warps, num_stages=stages)
    return faults
