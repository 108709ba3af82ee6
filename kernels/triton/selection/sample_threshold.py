"""Per-row selection threshold from a sample of the row's scores.

The sample (every key_stride-th score, computed by index_scores or read from a score matrix) is
held in registers; its rank-r value becomes the row's threshold lo. With r chosen a few standard
deviations above k / key_stride, the scores >= lo number between k and a small multiple of k with
overwhelming probability, so only those need to be kept; candidate_topk checks both bounds and
flags the rare row that misses. Rows whose sample holds fewer than r finite scores get
lo = -inf (every visible key is kept)."""
from __future__ import annotations

import math

import torch
from torch.library import wrap_triton
import triton
import triton.language as tl

from ..common import NEG_INF_KEY, key_to_value, next_pow2, ordered_key
from .radix_select import kth_largest

MAX_SAMPLE = 8192


@triton.jit
def sample_threshold_kernel(src_ptr, lo_ptr, rows_per_batch, n_sample, n_cols, rank, run_step,
                            stride_b, stride_r, stride_c, RUN: tl.constexpr,
                            BLOCK: tl.constexpr):
    r = tl.program_id(0)
    b = r // rows_per_batch
    i = r % rows_per_batch
    slots = tl.arange(0, BLOCK)
    # Sample j is column (j // RUN) * run_step + j % RUN: runs of RUN adjacent columns (whole
    # memory sectors) spread evenly over the row.
    cols = (slots // RUN) * run_step + slots % RUN
    valid = (slots < n_sample) & (cols < n_cols)
    values = tl.load(src_ptr + b.to(tl.int64) * stride_b + i.to(tl.int64) * stride_r
                     + cols.to(tl.int64) * stride_c, mask=valid, other=float("-inf"))
    values = tl.where(values == values, values, float("-inf"))
    keys = tl.where(valid, ordered_key(values), 0)
    threshold, _ = kth_largest(values, keys, rank, BLOCK)
    lo = tl.where(threshold > NEG_INF_KEY, key_to_value(threshold), float("-inf"))
    tl.store(lo_ptr + r, lo)


def sample_rank(k_top: int, key_stride: int) -> int:
    """Rank in a 1-in-key_stride sample whose value leaves at least k_top scores above it in the
    full row, with about 4 standard deviations of margin (binomial sampling)."""
    expected = math.ceil(k_top / key_stride)
    return expected + math.ceil(4.0 * math.sqrt(expected)) + 2


def sample_threshold(src: torch.Tensor, rank: int, n_sample: int, lo: torch.Tensor,
                     column_stride: int = 1) -> None:
    """lo [B*R] fp32 <- rank-th largest of n_sample entries of each row of src [B, R, n] (any
    strides): all of them when column_stride is 1, else 1 in column_stride taken as runs of
    32 adjacent columns (a full memory sector each, instead of one float per sector)."""
    batch, rows = src.shape[:2]
    block = next_pow2(max(n_sample, 16))
    if block > MAX_SAMPLE:
        raise ValueError(f"sample_threshold: {n_sample} samples exceed the limit {MAX_SAMPLE}")
    num_warps = max(4, min(16, block // 512))
    run = 1 if column_stride == 1 else 32
    wrap_triton(sample_threshold_kernel)[(batch * rows,)](
        src, lo, rows, n_sample, src.shape[2], rank, run * column_stride, src.stride(0),
        src.stride(1), src.stride(2), RUN=run, BLOCK=block, num_warps=num_warps)
