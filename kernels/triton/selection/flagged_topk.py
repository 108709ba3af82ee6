"""Exact top-k of the flagged rows of a score matrix, decided on the device.

candidate_topk flags the rare row whose sampled threshold missed (list overflow, or too few
candidates). Redoing those rows on the host would need their ids there: a device-to-host sync
per call, which stalls the stream (decode calls are short enough for the stall to show). Instead
this kernel is always launched with one program per row; unflagged rows return at once, and a
flagged row is selected exactly by streaming it from memory: four histogram passes find its k-th
largest ordered key (radix_select.py), one more pass places the keys above it and as many ties as
fit. Slow per row (5 passes over the row), but it only runs where a threshold missed.

Prefill selection never holds the score matrix (launch/scored_topk.py): there
rescore_flagged_rows scores each flagged row in full into a scratch row of its program (the
query_scores loop, scoring/query_scores.py), then selects from it the same way. A fixed number of
programs walks all rows, so memory stays O(programs x T) however many rows are flagged (all of
them, for a batch of padding queries whose scores all tie)."""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import wrap_triton
import triton
import triton.language as tl

from ..common import INTERPRET
from .radix_select import row_chunk, streamed_kth_largest_key
from ..scoring.query_scores import query_operands, score_query_keys


@triton.jit
def select_row_topk(row, n_cols, K, out_val, out_idx, BLOCK: tl.constexpr):
    """Exact top-K of the n_cols scores at `row` (column ids) into out_val / out_idx + slot."""
    offsets = tl.arange(0, BLOCK)
    # Lanes past n_cols (up to a whole piece) have key 0 and are counted, as in radix_select.
    threshold, n_above = streamed_kth_largest_key(row, n_cols, K,
                                                  tl.cdiv(n_cols, BLOCK) * BLOCK, BLOCK)
    placed_above = tl.zeros((), dtype=tl.int32)
    placed_tied = tl.zeros((), dtype=tl.int32)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + offsets
        values, keys = row_chunk(row, cols, n_cols)
        above = (keys > threshold).to(tl.int32)
        tied = ((keys == threshold) & (cols < n_cols)).to(tl.int32)
        pos_above = placed_above + tl.cumsum(above, axis=0) - 1
        pos_tied = n_above + placed_tied + tl.cumsum(tied, axis=0) - 1
        chosen = (above != 0) | ((tied != 0) & (pos_tied < K))
        pos = tl.where(above != 0, pos_above, pos_tied)
        tl.store(out_val + pos, values, mask=chosen)
        tl.store(out_idx + pos, cols.to(tl.int64), mask=chosen)
        placed_above += tl.sum(above, axis=0)
        placed_tied += tl.sum(tied, axis=0)


@triton.jit
def flagged_topk_kernel(src_ptr, flag_ptr, out_val_ptr, out_idx_ptr, rows_per_batch, n_cols, K,
                        stride_b, stride_r, stride_ob, stride_or, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    if tl.load(flag_ptr + r) != 0:
        b = r // rows_per_batch
        i = r % rows_per_batch
        row = src_ptr + b.to(tl.int64) * stride_b + i.to(tl.int64) * stride_r
        out = b.to(tl.int64) * stride_ob + i.to(tl.int64) * stride_or
        select_row_topk(row, n_cols, K, out_val_ptr + out, out_idx_ptr + out, BLOCK)


@triton.jit
def flagged_rescore_kernel(
    flag_ptr, scratch_ptr, out_val_ptr, out_idx_ptr, n_flat, rows, row0, K, n_programs,
    stride_ob, stride_or,
    q_ptr, k_ptr, w_ptr, cand_ptr, ks_ptr, ke_ptr, kscale_ptr, table_ptr, mask_ptr,
    S_total, T, HS, scale,
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
    BLOCK: tl.constexpr,
):
    # A fixed set of programs walks the rows (flag reads only, for the unflagged ones); each
    # flagged row is scored in full into the program's own scratch row, then selected from it.
    p = tl.program_id(0)
    scratch = scratch_ptr + p.to(tl.int64) * T
    for r in range(p, n_flat, n_programs):
        if tl.load(flag_ptr + r) != 0:
            b = r // rows
            i = r % rows
            score_query_keys(
                q_ptr, k_ptr, w_ptr, cand_ptr, ks_ptr, ke_ptr, scratch, kscale_ptr, table_ptr,
                mask_ptr, b, i, row0 + i, 0, T, S_total, T, HS, scale,
                stride_qb, stride_qs, stride_qh, stride_qd, stride_kb, stride_kt, stride_kd,
                stride_wb, stride_ws, stride_wh, stride_cb, stride_cs, stride_cn,
                stride_rb, stride_rs, stride_sb, stride_st, stride_tb,
                stride_mb, stride_ms, stride_mt, D,
                CAUSAL, RAGGED, GATHER, HAS_KSCALE, PAGED, PAGE, MASK_KIND, DOT_DTYPE,
                PRECISION, BLOCK_H, BLOCK_N, BLOCK_D)
            # The row's scores were stored by all threads of the program: wait for them all
            # before reading them back (and, below, before the next row overwrites them).
            tl.debug_barrier()
            out = b.to(tl.int64) * stride_ob + i.to(tl.int64) * stride_or
            select_row_topk(scratch, T, K, out_val_ptr + out, out_idx_ptr + out, BLOCK)
            tl.debug_barrier()


def flagged_topk(scores: torch.Tensor, flags: torch.Tensor, k_top: int, out_values: torch.Tensor,
                 out_indices: torch.Tensor) -> None:
    """Rows of scores [B, R, n] (fp32, unit column stride, n >= k_top) whose flag [B*R] is set
    get their exact top-k_top written to out_values / out_indices [B, R, >=k_top] (unit column
    stride, equal strides); other rows are left as they are. NaN ranks with -inf."""
    batch, rows, n_cols = scores.shape
    assert scores.stride(-1) == 1 and out_values.stride() == out_indices.stride()
    block, warps = (16, 1) if INTERPRET else (4096, 8)
    wrap_triton(flagged_topk_kernel)[(batch * rows,)](
        scores, flags, out_values, out_indices, rows, n_cols, k_top, scores.stride(0),
        scores.stride(1), out_values.stride(0), out_values.stride(1), BLOCK=block,
        num_warps=warps)


# Programs of the flagged-row recompute (about one per SM of an H100/H200): bounds its scratch to
# RESCORE_PROGRAMS x T fp32.
RESCORE_PROGRAMS = 128


def rescore_flagged_rows(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, flags: torch.Tensor,
                         k_top: int, out_values: torch.Tensor, out_indices: torch.Tensor, *,
                         rows: int, row0: int, causal: bool,
                         key_start: Optional[torch.Tensor], key_end: Optional[torch.Tensor],
                         scale: float, k_scale: Optional[torch.Tensor] = None,
                         mask: Optional[torch.Tensor] = None) -> None:
    """Rows [row0, row0 + rows) of each sequence whose flag [B*rows] is set get the exact top-k_top
    (k_top <= T) of their index scores against all T keys of k (query_scores' arguments) in
    out_values / out_indices [B, rows, >=k_top] (unit column stride, equal strides); the other
    rows are left as they are."""
    batch = q.shape[0]
    T = k.shape[1]
    assert out_values.stride() == out_indices.stride() and out_values.stride(-1) == 1
    operands, options = query_operands(q, k, w, causal=causal, key_start=key_start,
                                       key_end=key_end, scale=scale, k_scale=k_scale, mask=mask)
    flat = batch * rows
    programs = min(flat, 2 if INTERPRET else RESCORE_PROGRAMS)
    scratch = torch.empty(programs, T, dtype=torch.float32, device=q.device)
    wrap_triton(flagged_rescore_kernel)[(programs,)](
        flag_ptr=flags, scratch_ptr=scratch, out_val_ptr=out_values, out_idx_ptr=out_indices,
        n_flat=flat, rows=rows, row0=row0, K=k_top, n_programs=programs,
        stride_ob=out_values.stride(0), stride_or=out_values.stride(1), **operands,
        BLOCK=16 if INTERPRET else 1024, **options)
