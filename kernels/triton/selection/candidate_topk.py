"""Exact top-k of one short row per program (a candidate list, a row of re-rank or block scores).
The k-th largest ordered key is found by a radix select of the entries' value codes (three
32-bin histogram passes) and an exact finish (radix_select.kth_largest), then the entries above
it, and as many ties as still fit, are written to their output slots by a prefix sum. Output order is unspecified. A row is
either held in registers or streamed from memory in pieces of CHUNK lanes, one pass per step, so
that a program's registers hold one piece. Wider rows than STREAM_ABOVE (MISA-hierarchical's
lists of 8192 candidates, 16384 lanes) always stream: 16384 lanes in one program's registers
measured 3.9x the time of 8192 (spilling), where the work only doubles. Many narrower rows are
tuned between the two (see _tuned below); few are held in registers.

Rows shorter than k are padded with -inf entries whose key ids are in range but meaningless:
(tail_base[row] + slot - n) mod T, which are hidden keys when tail_base is the end of the row's
visible range (so the tail never duplicates a visible selected key).

When the row is a candidate list built from a threshold `lo` (see index_scores EMIT), the row is
flagged if the list overflowed (count > capacity) or holds fewer than k entries although lo was
finite: the selection is then incomplete and the caller recomputes that row."""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import wrap_triton
import triton
import triton.language as tl

from ..common import INTERPRET, next_pow2
from .radix_select import kth_largest, row_chunk, streamed_kth_largest

MAX_ROW = 16384
# Rows wider than this are streamed (pieces of STREAM_CHUNK lanes).
STREAM_ABOVE = 8192
STREAM_CHUNK = 4096


@triton.jit
def place_chunk(values, keys, slots, n, threshold, n_above, placed_above, placed_tied, K, T,
                idx_row, stride_ic, base, out_val, out_idx, HAS_IDX: tl.constexpr):
    """Writes the lanes of one piece that the selection keeps (above the threshold, then ties
    while slots remain) after the placed_above / placed_tied kept by earlier pieces; returns the
    piece's counts of both."""
    valid = slots < n
    above = keys > threshold
    tied = keys == threshold
    # One scan ranks both groups: above in the low 16 bits, tied in the high (a piece has at
    # most MAX_ROW < 2^16 lanes, so neither count carries into the other).
    ranks = tl.cumsum(above.to(tl.int32) + (tied.to(tl.int32) << 16), axis=0)
    pos_above = placed_above + (ranks & 0xFFFF) - 1
    pos_tied = n_above + placed_tied + (ranks >> 16) - 1
    chosen = above | (tied & (pos_tied < K))
    pos = tl.where(above, pos_above, pos_tied)
    if HAS_IDX:
        ids = tl.load(idx_row + slots.to(tl.int64) * stride_ic, mask=valid & chosen,
                      other=0).to(tl.int64)
    else:
        ids = slots.to(tl.int64)
    ids = tl.minimum(tl.maximum(ids, 0), T - 1)
    tail_ids = (base + pos.to(tl.int64) - n) % T
    ids = tl.where(valid, ids, tail_ids)
    tl.store(out_val + pos, values, mask=chosen)
    tl.store(out_idx + pos, ids, mask=chosen)
    return tl.sum(above.to(tl.int32), axis=0), tl.sum(tied.to(tl.int32), axis=0)


@triton.jit
def candidate_topk_kernel(
    val_ptr, idx_ptr, count_ptr, lo_ptr, tail_ptr, out_val_ptr, out_idx_ptr, flag_ptr,
    rows_per_batch, n_cols, T, K,
    stride_vb, stride_vr, stride_ib, stride_ir, stride_ic, stride_ob, stride_or,
    HAS_COUNT: tl.constexpr, HAS_IDX: tl.constexpr, HAS_LO: tl.constexpr,
    HAS_TAIL: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    r = tl.program_id(0)
    b = r // rows_per_batch
    i = r % rows_per_batch
    n = n_cols
    if HAS_COUNT:
        count = tl.load(count_ptr + r)
        n = tl.minimum(count, n_cols)
    row = val_ptr + b.to(tl.int64) * stride_vb + i.to(tl.int64) * stride_vr
    idx_row = idx_ptr + b.to(tl.int64) * stride_ib + i.to(tl.int64) * stride_ir
    out = b.to(tl.int64) * stride_ob + i.to(tl.int64) * stride_or
    base = 0
    if HAS_TAIL:
        base = tl.load(tail_ptr + r).to(tl.int64)
    zero = tl.zeros((), dtype=tl.int32)
    if CHUNK >= BLOCK:
        offsets = tl.arange(0, BLOCK)
        values, keys = row_chunk(row, offsets, n)
        threshold, n_above = kth_largest(values, keys, K, BLOCK)
        place_chunk(values, keys, offsets, n, threshold, n_above, zero, zero, K, T, idx_row,
                    stride_ic, base, out_val_ptr + out, out_idx_ptr + out, HAS_IDX)
    else:
        offsets = tl.arange(0, CHUNK)
        # Only the pieces that hold entries or output slots are visited: a candidate list is
        # mostly shorter than its capacity (about 2800 of 4096 at k = 2048). Padding lanes past
        # them are key 0 and would only add to bin 0, which no answer depends on (the lanes
        # visited are at least k).
        lanes = tl.minimum(tl.cdiv(tl.maximum(n, K), CHUNK) * CHUNK, BLOCK)
        threshold, n_above = streamed_kth_largest(row, n, K, lanes, CHUNK)
        placed_above = zero
        placed_tied = zero
        for c0 in range(0, lanes, CHUNK):
            values, keys = row_chunk(row, c0 + offsets, n)
            piece_above, piece_tied = place_chunk(
                values, keys, c0 + offsets, n, threshold, n_above, placed_above, placed_tied,
                K, T, idx_row, stride_ic, base, out_val_ptr + out, out_idx_ptr + out, HAS_IDX)
            placed_above += piece_above
            placed_tied += piece_tied

    if HAS_COUNT:
        bad = count > n_cols
        if HAS_LO:
            lo = tl.load(lo_ptr + r)
            bad = bad | ((count < K) & (lo > float("-inf")))
        tl.store(flag_ptr + r, bad.to(tl.int8))


def _default_warps(chunk: int) -> int:
    """Warps of a program holding `chunk` lanes, where no tuner runs. Measured on an H100 (8192
    rows held in registers): 16 warps fastest for 4096 and 8192 entries (0.87 and 1.61 ms,
    against 1.15 and 2.17 with 4 and 8), 32 for 16384 (6.2 ms, 8.3 with 16). Shorter rows
    (router heads, short contexts) scale down with the row."""
    return max(4, min(16, chunk // 256)) if chunk <= STREAM_ABOVE else 32


# Many rows of up to STREAM_ABOVE lanes (prefill chunks' candidate lists, re-rank rows, top-k
# alone) are tuned between the row held in registers by many warps (each step fast, one
# program an SM) and the row streamed from memory (L2, where the lists were just written) in
# pieces by a few warps (each step slower, but several programs an SM overlap their histogram
# and scan latencies). On an H100, 8192 lists of ~2800 entries (capacity 4096, k = 2048): 0.93 ms
# held in registers by 16 warps, 0.68 ms streamed in pieces of 1024 by 4 warps (the pick).
# Few rows (decode, the router's heads) keep the row in registers: they need the parallelism
# inside the row, and a tuning run would break a CUDA graph capture that is the first call.
# Wider rows (MISA-hierarchical's lists) always stream: their tuner tries few warps against
# pieces of STREAM_CHUNK by 16 warps (the untuned launch). The tuners key on the row width and on what the call reads and writes, not on the row count
# (the heights of causal chunks vary).
TUNED_ROWS = 512
TUNED_WIDTH = 1024
IN_REGISTERS = MAX_ROW  # a CHUNK of at least BLOCK holds the row in registers
_STREAMED = ((256, 1), (512, 1), (512, 2), (1024, 4), (2048, 4), (2048, 8))


def _tuner(pieces):
    return triton.autotune(
        configs=[triton.Config({"CHUNK": chunk}, num_warps=warps) for chunk, warps in pieces],
        key=["BLOCK", "HAS_COUNT", "HAS_IDX", "HAS_LO", "HAS_TAIL"])(candidate_topk_kernel)


_tuned = _tuner(((IN_REGISTERS, 4), (IN_REGISTERS, 8), (IN_REGISTERS, 16)) + _STREAMED)
_tuned_wide = _tuner(_STREAMED + ((STREAM_CHUNK, 16),))


def candidate_topk(values: torch.Tensor, k_top: int, T: int, out_values: torch.Tensor,
                   out_indices: torch.Tensor, *, ids: Optional[torch.Tensor] = None,
                   count: Optional[torch.Tensor] = None, lo: Optional[torch.Tensor] = None,
                   tail_base: Optional[torch.Tensor] = None,
                   flags: Optional[torch.Tensor] = None, chunk: int = 0,
                   num_warps: int = 0) -> None:
    """Top-k_top of each row of values [B, R, n] (unit column stride) into out_values/out_indices
    [B, R, >=k_top] (unit column stride, any row strides). ids [B, R, n] gives each entry's key id
    (default: its column); count [B*R] int32 the valid length of each row (default n); lo and
    flags [B*R] enable the overflow / too-few check of candidate lists (flags int8). chunk > 0
    streams every row in pieces of that many lanes (a power of 2), whatever its width, with
    no tuning (chunk >= the row's padded width holds it in registers), and with num_warps warps
    a program when given (a tuner's config, launched alone)."""
    batch, rows, n_cols = values.shape
    assert values.stride(-1) == 1 and out_values.stride(-1) == 1 and out_indices.stride(-1) == 1
    assert out_values.stride() == out_indices.stride()
    block = next_pow2(max(n_cols, k_top, 16))
    if block > MAX_ROW:
        raise ValueError(f"candidate_topk: rows of {n_cols} entries with k={k_top} exceed the "
                         f"in-register limit of {MAX_ROW}")
    dummy = values
    istr = ids.stride() if ids is not None else (0, 0, 0)
    args = (values, ids if ids is not None else dummy, count if count is not None else dummy,
            lo if lo is not None else dummy, tail_base if tail_base is not None else dummy,
            out_values, out_indices, flags if flags is not None else dummy,
            rows, n_cols, T, k_top,
            values.stride(0), values.stride(1), istr[0], istr[1], istr[2],
            out_values.stride(0), out_values.stride(1))
    meta = dict(HAS_COUNT=count is not None, HAS_IDX=ids is not None, HAS_LO=lo is not None,
                HAS_TAIL=tail_base is not None, BLOCK=block)
    grid = (batch * rows,)
    if chunk <= 0 and block >= TUNED_WIDTH and batch * rows >= TUNED_ROWS and not INTERPRET:
        wrap_triton(_tuned if block <= STREAM_ABOVE else _tuned_wide)[grid](*args, **meta)
        return
    if chunk <= 0:
        chunk = block if block <= STREAM_ABOVE else STREAM_CHUNK
    chunk = min(chunk, block)
    wrap_triton(candidate_topk_kernel)[grid](*args, **meta, CHUNK=chunk,
                                             num_warps=num_warps or _default_warps(chunk))
