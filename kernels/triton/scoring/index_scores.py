"""Index scores of a tile of queries against a tile of keys over the heads of q, with visibility
fused:

    I[t, n] = scale * sum_j w[t, j] * ReLU(q[t, j] . k[n * key_stride])     (-inf if hidden)

times k_scale[n * key_stride] when a per-key dequantization scale is given (FP8 keys: the scale
is a positive factor per key, so it commutes with the ReLU and the head sum and is applied once
to the score; a per-query scale is folded into w by the caller the same way).

Queries are the matrix rows, so one key tile (loaded once, kept on chip) serves every head of the
loop; each head's [BLOCK_M, D] query tile is loaded inside the loop. Accumulation is fp32. MISA's
routed heads arrive pre-gathered ([B, S, h, D], select.py): plain strided loads here measured 27%
faster on an H100 than gathering each row's head through the head table inside the loads.

Two outputs:
  FULL  writes the scores of every (query, key slot) to out [B, rows, n_cols] (hidden = -inf).
        With key_stride > 1 it scores an evenly spaced sample of the keys; with key_block > 1 each
        key row stands for key_block positions (pooled block keys: a block is visible when it
        overlaps the query's range).
  EMIT  appends the scores >= lo[row] (and finite) to per-row candidate lists; the [S, T] matrix
        is never written.

Visibility: causal, ragged ranges and the op's mask (bool, or additive: added to the scaled score,
a key hidden at or below HIDDEN_BIAS), all together. The mask tile is loaded before the key tile,
and tiles that no query of the tile can see are skipped (causal diagonal, ragged ranges, masked
out blocks)."""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import wrap_triton
import triton
import triton.language as tl

from ..common import (INTERPRET, MASK_NONE, append_candidates, dot_block_d, dot_config,
                     load_mask_tile, mask_operand, visible_range)

MODE_FULL = 0
MODE_EMIT = 1


@triton.jit
def range_visibility(first_pos, lo, hi, row_ok, col_ok, KEY_BLOCK: tl.constexpr):
    """[M, N] visibility of key rows starting at first_pos [N] to queries seeing [lo, hi) [M],
    False outside the tile's rows and columns. The bounds are folded into the two vectors (a
    row out of bounds sees nothing, a column out of bounds starts past every range), so that a
    tile entry costs two compares rather than four."""
    hi = tl.where(row_ok, hi, -2147483647)
    first_pos = tl.where(col_ok, first_pos, 2147483647 - KEY_BLOCK)
    return (first_pos[None, :] < hi[:, None]) & (first_pos[None, :] + KEY_BLOCK > lo[:, None])


@triton.jit
def finish_tile(scores, visible, lo, hi, key_rows, flat_rows, row_ok, lo_ptr, count_ptr, out_ptr,
                cand_idx_ptr, MODE: tl.constexpr, FORCE_ENDS: tl.constexpr,
                KEY_BLOCK: tl.constexpr, CAP: tl.constexpr, PER_ELEMENT: tl.constexpr):
    """A scored tile's visibility, forced ends and EMIT append; returns the tile FULL stores.
    `visible` may be the constant True (a tile every row sees whole), which folds away."""
    if MODE == 0:
        # NaN never wins a selection: it ranks with the hidden keys.
        scores = tl.where(visible & (scores == scores), scores, float("-inf"))
    if FORCE_ENDS:
        first_block = lo // KEY_BLOCK
        last_block = (hi - 1) // KEY_BLOCK
        ends = (key_rows[None, :] == first_block[:, None]) | (key_rows[None, :] == last_block[:, None])
        scores = tl.where(visible & ends, float("inf"), scores)
    if MODE == 1:
        # EMIT's compare drops NaN and hidden keys itself (a NaN is never >= the threshold).
        row_lo = tl.load(lo_ptr + flat_rows, mask=row_ok, other=float("inf"))
        append_candidates(scores, visible, key_rows, flat_rows, row_lo, count_ptr, out_ptr,
                          cand_idx_ptr, CAP, PER_ELEMENT)
    return scores


@triton.jit
def index_scores_kernel(
    q_ptr, k_ptr, w_ptr, ks_ptr, ke_ptr, lo_ptr, out_ptr, cand_idx_ptr, count_ptr,
    kscale_ptr, mask_ptr, rows, row0, S_total, T, n_keys, n_cols, HS, scale, key_stride,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kd,
    stride_wb, stride_ws, stride_wh,
    stride_rb, stride_rs,
    stride_ob, stride_or,
    stride_sb, stride_st,
    stride_mb, stride_ms, stride_mt,
    D,
    CAUSAL: tl.constexpr, RAGGED: tl.constexpr, MODE: tl.constexpr,
    FORCE_ENDS: tl.constexpr, KEY_BLOCK: tl.constexpr, HAS_KSCALE: tl.constexpr,
    MASK_KIND: tl.constexpr, DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr, CAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PER_ELEMENT: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)

    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = local < rows
    t = row0 + local
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    key_rows = cols * key_stride
    col_ok = (cols < n_cols) & (key_rows < n_keys)
    lo, hi = visible_range(b, t, row_ok, ks_ptr, ke_ptr, stride_rb, stride_rs, T, S_total,
                           CAUSAL, RAGGED)
    first_pos = key_rows * KEY_BLOCK
    # The mask tile is read first (only where the ranges leave keys visible), so tiles that the
    # mask hides from every query skip the dot products: a causal mask costs about what
    # causal=True costs. Its columns are the key rows (block ids for pooled keys).
    if MASK_KIND == 0:  # no mask
        # Whether the tile is skipped, from the ranges alone: a [BLOCK_M, BLOCK_N] visibility
        # reduced here stays live in registers through the head loop, and the EMIT variants
        # then spill (ptxas, sm_90: tests/kernels/sm90_builds.py --spills). Conservative: a
        # row that overlaps the tile's key span without seeing a sampled key only costs work.
        tile_lo = tl.min(tl.where(col_ok, first_pos, 2147483647), axis=0)
        tile_hi = tl.max(tl.where(col_ok, first_pos + KEY_BLOCK, -2147483647), axis=0)
        any_visible = tl.max(((hi > tile_lo) & (lo < tile_hi) & row_ok).to(tl.int32), axis=0) > 0
    else:
        visible, _ = load_mask_tile(mask_ptr, b, t[:, None], key_rows[None, :],
                                    range_visibility(first_pos, lo, hi, row_ok, col_ok,
                                                     KEY_BLOCK),
                                    stride_mb, stride_ms, stride_mt, MASK_KIND)
        any_visible = tl.max(visible.to(tl.int32), axis=1)
        any_visible = tl.max(any_visible, axis=0) > 0

    flat_rows = b * rows + local
    if any_visible:
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        k_tile = tl.load(k_ptr + b.to(tl.int64) * stride_kb + key_rows.to(tl.int64)[:, None] * stride_kt
                         + d[None, :] * stride_kd,
                         mask=col_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
        k_t = tl.trans(k_tile)
        q_rows = q_ptr + b.to(tl.int64) * stride_qb + t.to(tl.int64)[:, None] * stride_qs + d[None, :] * stride_qd
        w_rows = w_ptr + b.to(tl.int64) * stride_wb + t.to(tl.int64) * stride_ws
        q_mask = row_ok[:, None] & d_ok[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for j in range(HS):
            q_j = tl.load(q_rows + j * stride_qh, mask=q_mask, other=0.0)
            w_j = tl.load(w_rows + j * stride_wh, mask=row_ok, other=0.0)
            logits = tl.dot(q_j.to(DOT_DTYPE), k_t, input_precision=PRECISION)
            # ReLU that keeps NaN (as torch.relu does): a NaN score is then hidden below.
            relu = tl.maximum(logits, 0.0, propagate_nan=tl.PropagateNan.ALL)
            acc += w_j.to(tl.float32)[:, None] * relu
        scores = acc * tl.cast(scale, tl.float32)  # Inductor passes Python floats as fp64
        if HAS_KSCALE:
            k_scale = tl.load(kscale_ptr + b.to(tl.int64) * stride_sb
                              + key_rows.to(tl.int64) * stride_st, mask=col_ok, other=1.0)
            scores = scores * k_scale[None, :]
        if MASK_KIND == 2:
            # Reloaded here rather than held in registers through the head loop (L2 hit).
            _still_visible, bias = load_mask_tile(mask_ptr, b, t[:, None], key_rows[None, :],
                                                  visible, stride_mb, stride_ms, stride_mt,
                                                  MASK_KIND)
            scores = scores + bias
        if MASK_KIND == 0:
            # Computed here, not before the head loop, through which it would stay live.
            visible = range_visibility(first_pos, lo, hi, row_ok, col_ok, KEY_BLOCK)
            scores = finish_tile(scores, visible, lo, hi, key_rows, flat_rows, row_ok, lo_ptr,
                                 count_ptr, out_ptr, cand_idx_ptr, MODE, FORCE_ENDS, KEY_BLOCK,
                                 CAP, PER_ELEMENT)
        else:
            scores = finish_tile(scores, visible, lo, hi, key_rows, flat_rows, row_ok, lo_ptr,
                                 count_ptr, out_ptr, cand_idx_ptr, MODE, FORCE_ENDS, KEY_BLOCK,
                                 CAP, PER_ELEMENT)
    else:
        scores = tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32)
    if MODE == 0:
        out = (out_ptr + b.to(tl.int64) * stride_ob + local.to(tl.int64)[:, None] * stride_or
               + cols[None, :])
        tl.store(out, scores, mask=row_ok[:, None] & (cols < n_cols)[None, :])


# Autotuned per (head slots, head dim, routing, operand dtype, mask kind), one tuner per mode.
# 64 x 128 tiles keep the two fp32 accumulators of a tile in one warpgroup's registers;
# 128 x 128 and 64 x 256 halve the reloads of the per-head query tiles (which come from L2) per
# key. EMIT also tries both ways of reserving candidate slots.
_TILES = [({"BLOCK_M": 64, "BLOCK_N": 128}, 4), ({"BLOCK_M": 128, "BLOCK_N": 128}, 8),
          ({"BLOCK_M": 64, "BLOCK_N": 256}, 8)]
_KEY = ["HS", "BLOCK_D", "KEY_BLOCK", "HAS_KSCALE", "MASK_KIND"]


def _configs(per_element_choices):
    return [triton.Config({**tile, "PER_ELEMENT": per_element}, num_warps=warps, num_stages=3)
            for tile, warps in _TILES for per_element in per_element_choices]


# Two tuners rather than one with a config pruner: torch's wrap_triton rebuilds a pruned tuner
# without its reset_to_zero, and EMIT needs it.
_tuned_full = triton.autotune(configs=_configs((False,)), key=_KEY)(index_scores_kernel)
_tuned_emit = triton.autotune(
    configs=_configs((False, True)), key=_KEY,
    # EMIT appends to the counts: every tuning run starts from empty lists. (reset_to_zero, not
    # a pre_hook, so that Inductor can tune and launch the kernel itself.)
    reset_to_zero=["count_ptr"],
)(index_scores_kernel)


def index_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, *, rows: int, row0: int,
                 causal: bool, key_start: Optional[torch.Tensor], key_end: Optional[torch.Tensor],
                 scale: float, n_cols: int, key_stride: int = 1, key_block: int = 1, force_ends: bool = False,
                 out: Optional[torch.Tensor] = None,
                 emit: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = None,
                 total_queries: Optional[int] = None, total_positions: Optional[int] = None,
                 k_scale: Optional[torch.Tensor] = None,
                 mask: Optional[torch.Tensor] = None) -> None:
    """Scores queries [row0, row0 + rows) of q [B,S,H,D] against key slots [0, n_cols) of
    k [B,n_keys,D] (slot n is key row n * key_stride), times k_scale [B, n_keys] fp32 of the
    key row when given (never for pooled keys, which are already real values). `mask`, any
    shape broadcastable to [B, S, n_keys] (indexed by query and key row: for pooled keys, a
    block visibility), is the op's bool or additive mask, read through its strides.

    Exactly one of `out` (FULL: fp32 [B, rows, n_cols], any row strides, unit column stride) or
    `emit` = (lo [B*rows] fp32, cand_val [B*rows, CAP] fp32, cand_idx [B*rows, CAP] int32,
    count [B*rows] int32, zeroed) (EMIT) is given. `total_positions` is T of the visibility rules
    (defaults to k's length; differs for pooled keys)."""
    batch, queries, num_heads, dim = q.shape
    n_keys = k.shape[1]
    T = n_keys if total_positions is None else total_positions
    S_total = queries if total_queries is None else total_queries
    dot_dtype, precision = dot_config(q, k)
    ragged = key_start is not None
    mode = MODE_FULL if out is not None else MODE_EMIT
    dummy = q
    if mode == MODE_FULL:
        assert out.stride(-1) == 1
        out_ptr, cand_idx, lo, count, cap = out, dummy, dummy, dummy, 1
        stride_ob, stride_or = out.stride(0), out.stride(1)
    else:
        lo, cand_val, cand_idx, count = emit
        out_ptr, cap = cand_val, cand_val.shape[1]
        stride_ob, stride_or = 0, 0
    ks = key_start if ragged else dummy
    ke = key_end if ragged else dummy
    rstr = (key_start.stride(0), key_start.stride(1)) if ragged else (0, 0)
    assert k_scale is None or key_block == 1, "pooled keys are real values: no k_scale"
    mask_t, mask_kind, mstr = mask_operand(mask, batch, queries, n_keys)
    assert not (force_ends and mask_kind != MASK_NONE), "forced ends follow the ranges only"
    block_d = dot_block_d(dim, dot_dtype)
    sstr = k_scale.stride() if k_scale is not None else (0, 0)
    args = (q, k, w, ks, ke, lo, out_ptr, cand_idx, count,
            k_scale if k_scale is not None else dummy,
            mask_t if mask_t is not None else dummy,
            rows, row0, S_total, T, n_keys, n_cols, num_heads, float(scale), key_stride,
            *q.stride(), *k.stride(), *w.stride(), *rstr, stride_ob, stride_or, *sstr, *mstr, dim)
    meta = dict(CAUSAL=causal, RAGGED=ragged, MODE=mode,
                FORCE_ENDS=force_ends, KEY_BLOCK=key_block, HAS_KSCALE=k_scale is not None,
                MASK_KIND=mask_kind, DOT_DTYPE=dot_dtype,
                PRECISION=precision, CAP=cap, BLOCK_D=block_d)
    if INTERPRET:
        grid = (triton.cdiv(rows, 16), triton.cdiv(n_cols, 16), batch)
        wrap_triton(index_scores_kernel)[grid](*args, **meta, BLOCK_M=16, BLOCK_N=16)
        return

    def grid(m):
        return (triton.cdiv(rows, m["BLOCK_M"]), triton.cdiv(n_cols, m["BLOCK_N"]), batch)

    wrap_triton(_tuned_full if mode == MODE_FULL else _tuned_emit)[grid](*args, **meta)
