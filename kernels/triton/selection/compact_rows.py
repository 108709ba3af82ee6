"""Candidate lists from a score matrix already in memory: every finite score >= lo[row] is
appended to its row's list (value fp32 + key id int32).

Many rows (prefill chunks): one program owns one row and streams it in BLOCK-wide pieces, so a
slot is the row's running count plus a prefix sum inside the piece: no atomics, and the row is
read once, in column order. Few rows (decode): each row is split over several programs to fill
the card, and each piece reserves its slots with one atomic add on the row's count, so pieces
land in any order. Either way the count keeps growing past the capacity, so that the consumer
(candidate_topk) detects overflow."""
from __future__ import annotations

import torch
from torch.library import wrap_triton
import triton
import triton.language as tl

from ..common import INTERPRET

# Programs that fill the card (132 SMs on an H100/H200, a few resident per SM).
TARGET_PROGRAMS = 1024


@triton.jit
def compact_rows_kernel(src_ptr, lo_ptr, cand_val_ptr, cand_idx_ptr, count_ptr, rows_per_batch,
                        n_cols, cols_per_program, stride_b, stride_r, CAP: tl.constexpr,
                        SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    b = r // rows_per_batch
    i = r % rows_per_batch
    col_start = tl.program_id(1) * cols_per_program
    col_end = tl.minimum(col_start + cols_per_program, n_cols)
    row = src_ptr + b.to(tl.int64) * stride_b + i.to(tl.int64) * stride_r
    out_val = cand_val_ptr + r.to(tl.int64) * CAP
    out_idx = cand_idx_ptr + r.to(tl.int64) * CAP
    lo = tl.load(lo_ptr + r)
    count = tl.zeros((), dtype=tl.int32)
    for c0 in range(col_start, col_end, BLOCK):
        # Contiguity 1 makes the loads scalar and, with them, the layout the stores need: lane t
        # holds elements t, t + 32, ..., so the scan's slots and the stores stay in the load's
        # layout. With 4-wide vector loads the stores first went through shared memory (a
        # layout conversion with barriers every piece): 1.55 ms against 0.90 at 8192 x 65536
        # on an H100 (bench/profile_compact_rows.py, stages 2 and 6).
        cols = tl.max_contiguous(c0 + tl.arange(0, BLOCK), 1)
        x = tl.load(row + cols, mask=cols < col_end, other=float("-inf"))
        # NaN fails both comparisons, so it is never kept (it ranks with hidden keys).
        take = (x >= lo) & (x > float("-inf"))
        take_i = take.to(tl.int32)
        n_take = tl.sum(take_i, axis=0)
        if SPLIT:
            base = tl.atomic_add(count_ptr + r, n_take, sem="relaxed")
        else:
            base = count
        slot = base + tl.cumsum(take_i, axis=0) - 1
        keep = take & (slot < CAP)
        tl.store(out_val + slot, x, mask=keep)
        tl.store(out_idx + slot, cols, mask=keep)
        count += n_take
    if not SPLIT:
        tl.store(count_ptr + r, count)


# Narrow programs with many resident per SM hide the latency of each piece's prefix sum; the
# tuner picks the piece width and warps per program (keyed on the capacity and split, so the
# many widths of causal chunks do not each retune).
_tuned_kernel = triton.autotune(
    configs=[triton.Config({"BLOCK": block}, num_warps=warps)
             for block, warps in ((512, 1), (1024, 1), (1024, 2), (2048, 4), (4096, 8))],
    # Split rows accumulate into the count (whole rows overwrite it): every tuning run starts
    # from zero. reset_to_zero, not a pre_hook, so that Inductor can tune the kernel itself.
    key=["CAP", "SPLIT"], reset_to_zero=["count_ptr"],
)(compact_rows_kernel)


def compact_rows(src: torch.Tensor, lo: torch.Tensor, cand_val: torch.Tensor,
                 cand_idx: torch.Tensor, count: torch.Tensor, parts: int = 0) -> None:
    """src [B, R, n] fp32 (unit column stride); lo, count [B*R] (count is overwritten);
    cand_val fp32 / cand_idx int32 [B*R, CAP]. parts: programs per row (0: automatic, more than
    one only when there are too few rows to fill the card)."""
    batch, rows, n_cols = src.shape
    assert src.stride(-1) == 1
    flat = batch * rows
    # Each part is a whole number of the widest piece.
    piece = 16 if INTERPRET else 4096
    if parts <= 0:
        parts = min(triton.cdiv(TARGET_PROGRAMS, flat), triton.cdiv(n_cols, piece))
    cols_per_program = triton.cdiv(triton.cdiv(n_cols, parts), piece) * piece
    grid = (flat, triton.cdiv(n_cols, cols_per_program))
    split = grid[1] > 1
    if split:
        count.zero_()
    args = (src, lo, cand_val, cand_idx, count, rows, n_cols, cols_per_program, src.stride(0),
            src.stride(1))
    if INTERPRET:
        wrap_triton(compact_rows_kernel)[grid](*args, CAP=cand_val.shape[1], SPLIT=split, BLOCK=16,
                                  num_warps=1)
        return
    wrap_triton(_tuned_kernel)[grid](*args, CAP=cand_val.shape[1], SPLIT=split)
