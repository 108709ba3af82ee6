"""Exact top-k of the flagged rows of a score matrix in memory, decided on the device.

candidate_topk flags the rare row whose sampled threshold missed (list overflow, or too few
candidates). Redoing those rows on the host would need their ids there: a device-to-host sync
per call, which stalls the stream (decode calls are short enough for the stall to show). Instead
this kernel is always launched with one program per row; unflagged rows return at once, and a
flagged row is selected exactly by streaming it from memory: 32 count passes find its k-th
largest ordered key, one more pass places the keys above it and as many ties as fit. Slow per
row (33 passes over the row), but it only runs where a threshold missed."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, ordered_key


@triton.jit
def _row_keys(row, cols, n_cols):
    x = tl.load(row + cols, mask=cols < n_cols, other=float("-inf"))
    x = tl.where(x == x, x, float("-inf"))
    return x, tl.where(cols < n_cols, ordered_key(x), 0)


@triton.jit
def flagged_topk_kernel(src_ptr, flag_ptr, out_val_ptr, out_idx_ptr, rows_per_batch, n_cols, K,
                        stride_b, stride_r, stride_ob, stride_or, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    if tl.load(flag_ptr + r) != 0:
        b = r // rows_per_batch
        i = r % rows_per_batch
        row = src_ptr + b.to(tl.int64) * stride_b + i.to(tl.int64) * stride_r
        offsets = tl.arange(0, BLOCK)
        threshold = tl.zeros((), dtype=tl.uint32)
        for bit in tl.static_range(31, -1, -1):
            candidate = threshold | tl.full((), 1 << bit, tl.uint32)
            count = tl.zeros((), dtype=tl.int32)
            for c0 in range(0, n_cols, BLOCK):
                _, keys = _row_keys(row, c0 + offsets, n_cols)
                count += tl.sum((keys >= candidate).to(tl.int32), axis=0)
            threshold = tl.where(count >= K, candidate, threshold)
        n_above = tl.zeros((), dtype=tl.int32)
        for c0 in range(0, n_cols, BLOCK):
            _, keys = _row_keys(row, c0 + offsets, n_cols)
            n_above += tl.sum((keys > threshold).to(tl.int32), axis=0)
        out = b.to(tl.int64) * stride_ob + i.to(tl.int64) * stride_or
        placed_above = tl.zeros((), dtype=tl.int32)
        placed_tied = tl.zeros((), dtype=tl.int32)
        for c0 in range(0, n_cols, BLOCK):
            cols = c0 + offsets
            values, keys = _row_keys(row, cols, n_cols)
            above = (keys > threshold).to(tl.int32)
            tied = ((keys == threshold) & (cols < n_cols)).to(tl.int32)
            pos_above = placed_above + tl.cumsum(above, axis=0) - 1
            pos_tied = n_above + placed_tied + tl.cumsum(tied, axis=0) - 1
            chosen = (above != 0) | ((tied != 0) & (pos_tied < K))
            pos = tl.where(above != 0, pos_above, pos_tied)
            tl.store(out_val_ptr + out + pos, values, mask=chosen)
            tl.store(out_idx_ptr + out + pos, cols.to(tl.int64), mask=chosen)
            placed_above += tl.sum(above, axis=0)
            placed_tied += tl.sum(tied, axis=0)


def flagged_topk(scores: torch.Tensor, flags: torch.Tensor, k_top: int, out_values: torch.Tensor,
                 out_indices: torch.Tensor) -> None:
    """Rows of scores [B, R, n] (fp32, unit column stride, n >= k_top) whose flag [B*R] is set
    get their exact top-k_top written to out_values / out_indices [B, R, >=k_top] (unit column
    stride, equal strides); other rows are left as they are. NaN ranks with -inf."""
    batch, rows, n_cols = scores.shape
    assert scores.stride(-1) == 1 and out_values.stride() == out_indices.stride()
    block, warps = (16, 1) if INTERPRET else (4096, 8)
    flagged_topk_kernel[(batch * rows,)](
        scores, flags, out_values, out_indices, rows, n_cols, k_top, scores.stride(0),
        scores.stride(1), out_values.stride(0), out_values.stride(1), BLOCK=block,
        num_warps=warps)
