"""Candidate lists from a score matrix already in memory: every finite score >= lo[row] is
appended, in column order, to its row's list (value fp32 + key id int32).

One program owns one row and streams it in BLOCK-wide pieces, so a slot is the row's running
count plus a prefix sum inside the piece: no atomics and no cross-program reservation, and the
row is read exactly once at full memory bandwidth. The count keeps growing past the capacity so
that the consumer (candidate_topk) detects overflow."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET


@triton.jit
def compact_rows_kernel(src_ptr, lo_ptr, cand_val_ptr, cand_idx_ptr, count_ptr, rows_per_batch,
                        n_cols, stride_b, stride_r, CAP: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    b = r // rows_per_batch
    i = r % rows_per_batch
    row = src_ptr + b.to(tl.int64) * stride_b + i.to(tl.int64) * stride_r
    out_val = cand_val_ptr + r.to(tl.int64) * CAP
    out_idx = cand_idx_ptr + r.to(tl.int64) * CAP
    lo = tl.load(lo_ptr + r)
    count = tl.zeros((), dtype=tl.int32)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        x = tl.load(row + cols, mask=cols < n_cols, other=float("-inf"))
        # NaN fails both comparisons, so it is never kept (it ranks with hidden keys).
        take = (x >= lo) & (x > float("-inf"))
        take_i = take.to(tl.int32)
        slot = count + tl.cumsum(take_i, axis=0) - 1
        keep = take & (slot < CAP)
        tl.store(out_val + slot, x, mask=keep)
        tl.store(out_idx + slot, cols, mask=keep)
        count += tl.sum(take_i, axis=0)
    tl.store(count_ptr + r, count)


# Narrow programs with many resident per SM hide the latency of each piece's prefix sum; the
# tuner picks the piece width and warps per program (keyed on the capacity only, so the many
# widths of causal chunks do not each retune).
_tuned_kernel = triton.autotune(
    configs=[triton.Config({"BLOCK": block}, num_warps=warps)
             for block, warps in ((512, 1), (1024, 1), (1024, 2), (2048, 4), (4096, 8))],
    key=["CAP"],
)(compact_rows_kernel)


def compact_rows(src: torch.Tensor, lo: torch.Tensor, cand_val: torch.Tensor,
                 cand_idx: torch.Tensor, count: torch.Tensor) -> None:
    """src [B, R, n] fp32 (unit column stride); lo, count [B*R] (count is overwritten);
    cand_val fp32 / cand_idx int32 [B*R, CAP]. Idempotent, so safe to autotune."""
    batch, rows, n_cols = src.shape
    assert src.stride(-1) == 1
    args = (src, lo, cand_val, cand_idx, count, rows, n_cols, src.stride(0), src.stride(1))
    if INTERPRET:
        compact_rows_kernel[(batch * rows,)](*args, CAP=cand_val.shape[1], BLOCK=16, num_warps=1)
        return
    _tuned_kernel[(batch * rows,)](*args, CAP=cand_val.shape[1])
