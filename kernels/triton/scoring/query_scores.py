"""Index scores of ONE query against a run of keys, with the keys as the matrix rows:

    I[t, n] = scale * sum_j w[t, j] * ReLU(q[t, j] . k[key(n)])       (-inf if hidden)

times k_scale[key(n)] when a per-key dequantization scale is given (FP8 keys; a positive factor
per key commutes with the ReLU and the head sum). With a block table (PAGED), k is a paged cache
[P, PAGE, D] (k_scale [P, PAGE]) and key n of sequence b is read from its page (paging.py).

The shape for few queries per sequence: decode (one query per sequence, a batch of sequences of
different lengths through ragged ranges) and re-ranking (each query's own candidate keys,
gathered by index inside the load). The query's [D, heads] tile stays on chip while the program
walks its share of the key axis, one [keys, D] x [D, heads] product per key tile; the weighted
head sum then runs along each thread's own accumulator columns (a few shuffles), where heads as
the matrix rows made it a cross-warp reduction (1.7x slower on an H100 for the gathered re-rank).
Routed heads arrive pre-gathered (select.py); fewer than 16 heads are padded with zero weights,
the smallest tile the matrix units take."""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import wrap_triton
import triton
import triton.language as tl

from ..common import (INTERPRET, dot_block_d, dot_config, load_mask_tile, mask_operand,
                     next_pow2, visible_range)
from ..paging import key_location


@triton.jit
def score_query_keys(
    q_ptr, k_ptr, w_ptr, cand_ptr, ks_ptr, ke_ptr, out_row, kscale_ptr, table_ptr, mask_ptr,
    b, i, t, col_start, col_end, S_total, T, HS, scale,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kd,
    stride_wb, stride_ws, stride_wh,
    stride_cb, stride_cs, stride_cn,
    stride_rb, stride_rs,
    stride_sb, stride_st, stride_tb,
    stride_mb, stride_ms, stride_mt,
    D,
    CAUSAL: tl.constexpr, RAGGED: tl.constexpr, GATHER: tl.constexpr,
    HAS_KSCALE: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
    MASK_KIND: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Scores of query t of sequence b (row i of the candidates) for columns
    [col_start, col_end), written to out_row + column. Shared by query_scores_kernel and the
    exact recompute of flagged rows (selection/flagged_topk.py)."""
    lo, hi = visible_range(b, t, True, ks_ptr, ke_ptr, stride_rb, stride_rs, T, S_total,
                           CAUSAL, RAGGED)

    heads = tl.arange(0, BLOCK_H)
    slot_ok = heads < HS
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q_base = q_ptr + b.to(tl.int64) * stride_qb + t.to(tl.int64) * stride_qs
    q = tl.load(q_base + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=slot_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
    q_t = tl.trans(q)
    w = tl.load(w_ptr + b.to(tl.int64) * stride_wb + t.to(tl.int64) * stride_ws + heads * stride_wh,
                mask=slot_ok, other=0.0).to(tl.float32)

    if not GATHER:
        # Keys outside [lo, hi) are hidden for this query: walk only the visible part.
        first = tl.maximum(col_start, lo // BLOCK_N * BLOCK_N)
        last = tl.minimum(col_end, hi)
    else:
        first = col_start
        last = col_end
    # Columns of this program that the walk skips are hidden: write them once.
    for c0 in range(col_start, col_end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        if (c0 + BLOCK_N <= first) | (c0 >= last):
            tl.store(out_row + cols, tl.full([BLOCK_N], float("-inf"), tl.float32),
                     mask=cols < col_end)
    for c0 in range(first // BLOCK_N * BLOCK_N, last, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = (cols < col_end) & (cols >= col_start)
        if GATHER:
            keys = tl.load(cand_ptr + b.to(tl.int64) * stride_cb + i.to(tl.int64) * stride_cs
                           + cols.to(tl.int64) * stride_cn, mask=col_ok, other=-1)
        else:
            keys = cols.to(tl.int64)
        visible = col_ok & (keys >= lo) & (keys < hi) & (keys >= 0) & (keys < T)
        # Masked-out keys are neither read from the mask twice nor loaded from k.
        visible, bias = load_mask_tile(mask_ptr, b, t, keys, visible, stride_mb, stride_ms,
                                       stride_mt, MASK_KIND)
        outer, inner = key_location(b, keys, visible, table_ptr, stride_tb, PAGED, PAGE)
        k_tile = tl.load(k_ptr + (outer * stride_kb + inner * stride_kt)[:, None]
                         + d[None, :] * stride_kd, mask=visible[:, None] & d_ok[None, :],
                         other=0.0).to(DOT_DTYPE)
        logits = tl.dot(k_tile, q_t, input_precision=PRECISION)
        scores = tl.sum(w[None, :] * tl.maximum(logits, 0.0, propagate_nan=tl.PropagateNan.ALL),
                        axis=1) * tl.cast(scale, tl.float32)  # fp64 when Inductor launches
        if HAS_KSCALE:
            scores = scores * tl.load(kscale_ptr + outer * stride_sb + inner * stride_st,
                                      mask=visible, other=1.0)
        if MASK_KIND == 2:
            scores = scores + bias
        scores = tl.where(visible & (scores == scores), scores, float("-inf"))
        tl.store(out_row + cols, scores, mask=col_ok)


@triton.jit
def query_scores_kernel(
    q_ptr, k_ptr, w_ptr, cand_ptr, ks_ptr, ke_ptr, out_ptr, kscale_ptr, table_ptr, mask_ptr,
    rows, row0, S_total, T, n_cols, HS, scale, cols_per_program,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kd,
    stride_wb, stride_ws, stride_wh,
    stride_cb, stride_cs, stride_cn,
    stride_rb, stride_rs,
    stride_ob, stride_or,
    stride_sb, stride_st, stride_tb,
    stride_mb, stride_ms, stride_mt,
    D,
    CAUSAL: tl.constexpr, RAGGED: tl.constexpr, GATHER: tl.constexpr,
    HAS_KSCALE: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
    MASK_KIND: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = r // rows
    i = r % rows
    col_start = pid_n * cols_per_program
    col_end = tl.minimum(col_start + cols_per_program, n_cols)
    out_row = out_ptr + b.to(tl.int64) * stride_ob + i.to(tl.int64) * stride_or
    score_query_keys(
        q_ptr, k_ptr, w_ptr, cand_ptr, ks_ptr, ke_ptr, out_row, kscale_ptr, table_ptr, mask_ptr,
        b, i, row0 + i, col_start, col_end, S_total, T, HS, scale,
        stride_qb, stride_qs, stride_qh, stride_qd, stride_kb, stride_kt, stride_kd,
        stride_wb, stride_ws, stride_wh, stride_cb, stride_cs, stride_cn, stride_rb, stride_rs,
        stride_sb, stride_st, stride_tb, stride_mb, stride_ms, stride_mt, D,
        CAUSAL, RAGGED, GATHER, HAS_KSCALE, PAGED, PAGE, MASK_KIND, DOT_DTYPE, PRECISION,
        BLOCK_H, BLOCK_N, BLOCK_D)


def query_tile(block_h: int, key_bytes: int, gathered: bool) -> tuple[int, int, int]:
    """(BLOCK_N keys a tile, num_warps, num_stages) of score_query_keys for BLOCK_H head slots,
    keys of key_bytes bytes an element, and gathered (candidate) keys or a run of keys."""
    if INTERPRET:
        return 16, 1, 1
    # 64-key tiles with 4 warps measured fastest on an H100 for the gathered re-rank (64 heads,
    # 3.84 ms against 4.62 ms with 128-key tiles at 8192 x 8192 candidates). Decode over a run
    # of keys (H200, 64 x 64K, docs/results/decode_tiles_host_h200.json, paged / contiguous):
    # 128-key tiles win for 8 routed bf16 heads (0.287 / 0.264 ms against 0.323 / 0.265) and
    # for 64 FP8 heads (0.185 / 0.166 against 0.233 / 0.178), and lose for 64 bf16 heads
    # (0.323 against 0.308 paged) and 8 FP8 heads (0.181 against 0.164). A measured choice:
    # no simple rule of bytes or math per key orders all four.
    # fp32 tiles are twice as large: three stages would not fit shared memory.
    wide = not gathered and ((block_h <= 16 and key_bytes == 2)
                             or (block_h >= 64 and key_bytes == 1))
    return 128 if wide else 64, 4 if block_h <= 64 else 8, 2 if key_bytes >= 4 else 3


def query_operands(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, *, causal: bool,
                   key_start: Optional[torch.Tensor], key_end: Optional[torch.Tensor],
                   scale: float, candidates: Optional[torch.Tensor] = None,
                   k_scale: Optional[torch.Tensor] = None,
                   block_table: Optional[torch.Tensor] = None,
                   mask: Optional[torch.Tensor] = None) -> tuple[dict, dict]:
    """(operands, launch options) of score_query_keys, by argument name, for the kernels that
    call it; see query_scores for the arguments."""
    batch, queries, num_heads, dim = q.shape
    page = k.shape[1] if block_table is not None else 1
    T = k.shape[1] if block_table is None else block_table.shape[1] * page
    dot_dtype, precision = dot_config(q, k)
    ragged = key_start is not None
    dummy = q
    cstr = candidates.stride() if candidates is not None else (0, 0, 0)
    rstr = (key_start.stride(0), key_start.stride(1)) if ragged else (0, 0)
    block_h = max(16, next_pow2(num_heads))
    sstr = k_scale.stride() if k_scale is not None else (0, 0)
    assert mask is None or block_table is None, "the paged op has no mask"
    mask_t, mask_kind, mstr = mask_operand(mask, batch, queries, T)
    block_n, warps, stages = query_tile(block_h, k.element_size(), candidates is not None)
    operands = dict(
        q_ptr=q, k_ptr=k, w_ptr=w, cand_ptr=candidates if candidates is not None else dummy,
        ks_ptr=key_start if ragged else dummy, ke_ptr=key_end if ragged else dummy,
        kscale_ptr=k_scale if k_scale is not None else dummy,
        table_ptr=block_table if block_table is not None else dummy,
        mask_ptr=mask_t if mask_t is not None else dummy,
        S_total=queries, T=T, HS=num_heads, scale=float(scale),
        stride_qb=q.stride(0), stride_qs=q.stride(1), stride_qh=q.stride(2),
        stride_qd=q.stride(3), stride_kb=k.stride(0), stride_kt=k.stride(1),
        stride_kd=k.stride(2), stride_wb=w.stride(0), stride_ws=w.stride(1),
        stride_wh=w.stride(2), stride_cb=cstr[0], stride_cs=cstr[1], stride_cn=cstr[2],
        stride_rb=rstr[0], stride_rs=rstr[1], stride_sb=sstr[0], stride_st=sstr[1],
        stride_tb=block_table.stride(0) if block_table is not None else 0,
        stride_mb=mstr[0], stride_ms=mstr[1], stride_mt=mstr[2], D=dim,
        CAUSAL=causal, RAGGED=ragged, GATHER=candidates is not None,
        HAS_KSCALE=k_scale is not None, PAGED=block_table is not None, PAGE=page,
        MASK_KIND=mask_kind, DOT_DTYPE=dot_dtype, PRECISION=precision, BLOCK_H=block_h,
        BLOCK_N=block_n, BLOCK_D=dot_block_d(dim, dot_dtype))
    return operands, dict(num_warps=warps, num_stages=stages)


def query_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, out: torch.Tensor, *,
                 rows: int, row0: int, causal: bool, key_start: Optional[torch.Tensor],
                 key_end: Optional[torch.Tensor], scale: float,
                 candidates: Optional[torch.Tensor] = None,
                 k_scale: Optional[torch.Tensor] = None,
                 block_table: Optional[torch.Tensor] = None,
                 mask: Optional[torch.Tensor] = None) -> None:
    """out [B, rows, n_cols] fp32 (unit column stride) <- scores of queries [row0, row0+rows)
    against keys 0..n_cols-1, or against candidates [B, S, n_cols] (key ids; ids outside [0, T)
    score -inf) when given; each key's score times k_scale [B, T] fp32 when given. With
    block_table [B, pages] (int32/int64, unit column stride), k is a paged cache [P, page, D],
    k_scale is [P, page], T = pages * page, and the table is read only for visible keys. `mask`
    (bool or additive, broadcastable to [B, S, T]; not with a block table) is read through its
    strides at each query's (gathered) key ids."""
    batch = q.shape[0]
    n_cols = out.shape[2]
    assert out.stride(-1) == 1
    operands, options = query_operands(q, k, w, causal=causal, key_start=key_start,
                                       key_end=key_end, scale=scale, candidates=candidates,
                                       k_scale=k_scale, block_table=block_table, mask=mask)
    block_n = operands["BLOCK_N"]
    # Enough programs to fill the card, each walking a long run of keys (the query tile is
    # loaded once per program).
    programs_per_row = max(1, min(triton.cdiv(n_cols, block_n), triton.cdiv(1024, batch * rows)))
    cols_per_program = triton.cdiv(triton.cdiv(n_cols, programs_per_row), block_n) * block_n
    grid = (batch * rows, triton.cdiv(n_cols, cols_per_program))
    wrap_triton(query_scores_kernel)[grid](
        **operands, out_ptr=out, rows=rows, row0=row0, n_cols=n_cols,
        cols_per_program=cols_per_program, stride_ob=out.stride(0), stride_or=out.stride(1),
        **options)
