"""Candidate lists from a score matrix already in memory: every finite score >= lo[row] is
appended to its row's list (the same append as index_scores' EMIT mode, reading scores instead
of computing them). One pass over the matrix, a few atomics per row and tile."""
from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError

from .common import INTERPRET, append_candidates


@triton.jit
def emit_candidates_kernel(src_ptr, lo_ptr, cand_val_ptr, cand_idx_ptr, count_ptr,
                           rows_per_batch, n_cols, stride_b, stride_r,
                           CAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           PER_ELEMENT: tl.constexpr = False):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = local < rows_per_batch
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    scores = tl.load(src_ptr + b.to(tl.int64) * stride_b + local.to(tl.int64)[:, None] * stride_r
                     + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=float("-inf"))
    scores = tl.where(scores == scores, scores, float("-inf"))
    flat_rows = b * rows_per_batch + local
    lo = tl.load(lo_ptr + flat_rows, mask=row_ok, other=float("inf"))
    append_candidates(scores, cols, flat_rows, row_ok, col_ok, lo, count_ptr, cand_val_ptr,
                      cand_idx_ptr, CAP, PER_ELEMENT)


def _reset_count(kwargs, reset_only=False):
    kwargs["count_ptr"].zero_()


_tuned_kernel = triton.autotune(
    configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n, "PER_ELEMENT": p}, num_warps=8)
             for m, n in ((8, 1024), (16, 512)) for p in (False, True)],
    key=["CAP"], pre_hook=_reset_count,
)(emit_candidates_kernel)


def emit_candidates(src: torch.Tensor, lo: torch.Tensor, cand_val: torch.Tensor,
                    cand_idx: torch.Tensor, count: torch.Tensor) -> None:
    """src [B, R, n] fp32 (unit column stride); lo, count [B*R]; cand_* [B*R, CAP]."""
    batch, rows, n_cols = src.shape
    assert src.stride(-1) == 1
    args = (src, lo, cand_val, cand_idx, count, rows, n_cols, src.stride(0), src.stride(1))
    if INTERPRET:
        grid = (triton.cdiv(rows, 16), triton.cdiv(n_cols, 16), batch)
        emit_candidates_kernel[grid](*args, CAP=cand_val.shape[1], BLOCK_M=16, BLOCK_N=16,
                                     num_warps=1)
        return

    def grid(m):
        return (triton.cdiv(rows, m["BLOCK_M"]), triton.cdiv(n_cols, m["BLOCK_N"]), batch)

    try:
        _tuned_kernel[grid](*args, CAP=cand_val.shape[1])
    except CompilationError as error:
        warnings.warn(f"emit_candidates: autotuned variants failed to compile ({error!r:.200}); "
                      "using the prefix-sum variant")
        count.zero_()
        safe = dict(BLOCK_M=8, BLOCK_N=1024, PER_ELEMENT=False)
        emit_candidates_kernel[grid(safe)](*args, CAP=cand_val.shape[1], **safe, num_warps=8)
