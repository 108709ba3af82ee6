"""Device helpers shared by the indexer kernels, and the launch-side constants they rely on.

Selection works on order-preserving 32-bit keys of fp32 scores: for any two floats a < b the
unsigned keys satisfy key(a) < key(b), so "the k-th largest score" becomes "the k-th largest
unsigned integer", found exactly by a radix select over their bytes (selection/radix_select.py).
Key 0 (a negative NaN bit pattern, never produced after NaN scrubbing) marks padding slots."""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

# Read once: TRITON_INTERPRET must be set before the kernels are decorated (see tests/conftest.py).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
INTERPRETED = tl.constexpr(INTERPRET)

# Ordered key of -inf: every hidden (or NaN) score maps here, padding maps below it, to 0.
NEG_INF_KEY = tl.constexpr(0x007FFFFF)

# The op's `mask` as the kernels see it (MASK_KIND constexpr): none, bool (loaded as uint8,
# nonzero = visible) or additive float (bf16/fp16/fp32, added to the scaled score).
MASK_NONE, MASK_BOOL, MASK_ADDITIVE = 0, 1, 2
# An additive mask hides a key at or below float16's lowest finite value (visibility.HIDDEN_BIAS):
# -inf, finfo(bf16/fp32).min and finfo(fp16).min all hide, NaN hides too (the comparison fails).
HIDDEN_BIAS = tl.constexpr(float(torch.finfo(torch.float16).min))


@triton.jit
def ordered_key(x):
    """fp32 -> uint32 with the same order (negative floats have their bits flipped)."""
    bits = x.to(tl.uint32, bitcast=True)
    negative = (bits >> 31) != 0
    return tl.where(negative, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def key_to_value(key):
    """Inverse of ordered_key."""
    positive = key >= 0x80000000
    bits = tl.where(positive, key & 0x7FFFFFFF, key ^ 0xFFFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def visible_range(b, t, row_ok, ks_ptr, ke_ptr, stride_rb, stride_rs, T, S_total,
                  CAUSAL: tl.constexpr, RAGGED: tl.constexpr):
    """[lo, hi) of key positions visible to query t of batch b (end-aligned causal AND ragged)."""
    lo = tl.zeros_like(t)
    hi = tl.zeros_like(t) + T
    if CAUSAL:
        hi = tl.minimum(hi, T - S_total + t + 1)
    if RAGGED:
        offset = b.to(tl.int64) * stride_rb + t.to(tl.int64) * stride_rs
        lo = tl.maximum(lo, tl.load(ks_ptr + offset, mask=row_ok, other=0).to(tl.int32))
        hi = tl.minimum(hi, tl.load(ke_ptr + offset, mask=row_ok, other=0).to(tl.int32))
    return lo, hi


@triton.jit
def load_mask_tile(mask_ptr, b, t, keys, ok, stride_mb, stride_ms, stride_mt,
                   MASK_KIND: tl.constexpr):
    """(visible, bias) of the mask entries [b, t, keys] where `ok` holds; t (query positions) and
    keys (key positions) broadcast against each other: a [M, 1] column and a [1, N] row make a
    tile, a scalar query and a [N] row a vector. The mask is read through its strides (stride 0
    on broadcast dims); entries outside `ok` are not read and come back hidden, so `ok` should
    already be the causal / ragged visibility (hidden tiles then cost no mask traffic).
    visible = ok AND (bool: entry nonzero; additive: entry > HIDDEN_BIAS). bias (additive only,
    fp32; 0.0 otherwise) is what the caller adds to the scaled score."""
    if MASK_KIND == 0:
        visible = ok
        bias = 0.0
    else:
        offsets = (b.to(tl.int64) * stride_mb + t.to(tl.int64) * stride_ms
                   + keys.to(tl.int64) * stride_mt)
        raw = tl.load(mask_ptr + offsets, mask=ok, other=0)
        if MASK_KIND == 1:
            visible = ok & (raw != 0)
            bias = 0.0
        else:
            bias = raw.to(tl.float32)
            visible = ok & (bias > HIDDEN_BIAS)
    return visible, bias


@triton.jit
def append_candidates(scores, visible, key_ids, flat_rows, lo, count_ptr, cand_val_ptr,
                      cand_idx_ptr, CAP: tl.constexpr, PER_ELEMENT: tl.constexpr):
    """Appends the entries of a [M, N] score tile that are visible (a mask that also holds the
    tile's row and column bounds, or the constant True), finite and >= lo[row] to per-row
    candidate lists (values fp32, key ids int32) of capacity CAP. Counts keep growing past CAP
    so that the consumer can detect overflow. Two ways to reserve slots (the autotuner picks):
    one atomic per row and a prefix sum across the tile, or one atomic per kept entry (few
    entries pass the threshold, and it needs no cross-thread scan)."""
    take = (scores >= lo[:, None]) & (scores > float("-inf")) & visible
    if PER_ELEMENT:
        counters = tl.broadcast_to((count_ptr + flat_rows)[:, None], scores.shape)
        slot = tl.atomic_add(counters, 1, mask=take, sem="relaxed")
    else:
        take_i = take.to(tl.int32)
        per_row = tl.sum(take_i, axis=1)
        base = tl.atomic_add(count_ptr + flat_rows, per_row, mask=per_row > 0,
                             sem="relaxed")
        slot = base[:, None] + tl.cumsum(take_i, axis=1) - 1
    keep = take & (slot < CAP)
    row_val = cand_val_ptr + flat_rows.to(tl.int64) * CAP
    row_idx = cand_idx_ptr + flat_rows.to(tl.int64) * CAP
    ids = tl.broadcast_to(key_ids[None, :], scores.shape).to(tl.int32)
    # On the GPU the stores are PTX in the MMA result's layout: tl.store's conversion through
    # shared memory cost EMIT 0.5 ms at 8192 x 64K, h = 8 (3.44 -> 2.93 ms on an H100) and
    # spilled registers. The CPU interpreter cannot run PTX.
    if INTERPRETED:
        tl.store(row_val[:, None] + slot, scores, mask=keep)
        tl.store(row_idx[:, None] + slot, ids, mask=keep)
    else:
        stored = store_pair_where(row_val[:, None] + slot, scores, row_idx[:, None] + slot, ids,
                                  keep)
        declare_written(row_val, row_idx, tl.max(stored, axis=1))


@triton.jit
def store_pair_where(val_ptrs, values, idx_ptrs, ids, keep):
    """Stores values (fp32) and ids (int32) where keep holds, as predicated PTX stores in the
    operands' own layout: tl.store with pointers of unknown contiguity first moves every
    operand through shared memory into a one-lane-per-element layout. Returns keep as int32
    (see declare_written)."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $5, 0; @p st.global.b32 [$1], $2; "
        "@p st.global.b32 [$3], $4; mov.b32 $0, $5; }",
        "=r,l,r,l,r,r", [val_ptrs.to(tl.int64), values.to(tl.int32, bitcast=True),
                         idx_ptrs.to(tl.int64), ids,
                         keep.to(tl.int32)], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def store_int64_where(ptrs, values, keep, result):
    """Stores int64 values where keep holds, as a predicated PTX store in the operands' own
    layout, and returns `result` (int32) unchanged: the caller uses it, which keeps the pure asm
    live (see declare_written). A store in asm is invisible to Inductor's kernel analysis, so
    the address may depend on data the kernel only reads without that data being marked
    written; the kernel must write `ptrs`' tensor by tl.store elsewhere."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $3, 0; @p st.global.b64 [$1], $2; mov.b32 $0, $4; }",
        "=r,l,l,r,r", [ptrs.to(tl.int64), values, keep.to(tl.int32), result], dtype=tl.int32,
        is_pure=True, pack=1)


@triton.jit
def declare_written(val_ptr, idx_ptr, stored):
    """A store that never happens (stored is 0 or 1), to the lists store_pair_where wrote. It
    keeps the pure asm live (Triton drops pure ops whose results go unused; a non-pure asm
    would make Inductor's mutation analysis give up and assume every input is written), and
    it shows that analysis, which cannot see into asm, that the kernel writes both lists."""
    never = stored > 1
    tl.store(val_ptr, stored.to(tl.float32), mask=never)
    tl.store(idx_ptr, stored, mask=never)


def mask_operand(mask: Optional[torch.Tensor], batch: int, queries: int, keys: int
                 ) -> tuple[Optional[torch.Tensor], int, tuple[int, int, int]]:
    """(tensor for the kernel, MASK_KIND, (stride_b, stride_s, stride_t)) of an op's mask, any
    shape broadcastable to [B, S, T]. The expand is a view (stride 0 on broadcast dims): nothing
    of size [B, S, T] is copied. Bool masks are reinterpreted as uint8 (Triton loads bytes)."""
    if mask is None:
        return None, MASK_NONE, (0, 0, 0)
    view = mask.expand(batch, queries, keys)
    if view.dtype == torch.bool:
        return view.view(torch.uint8), MASK_BOOL, view.stride()
    if view.dtype == torch.uint8:  # the kernels' own block visibility (never a user's mask)
        return view, MASK_BOOL, view.stride()
    return view, MASK_ADDITIVE, view.stride()


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def dot_config(*tensors: torch.Tensor) -> tuple[tl.dtype, str]:
    """(operand dtype, input precision) for tl.dot over these inputs, always accumulating in fp32:
    FP8 e4m3 when every input is (the interpreter computes those dots exactly too); their 16-bit
    dtype when they share one, FP8 e4m3 inputs among them included (e4m3 -> bf16/fp16 is exact);
    else fp32 with 3-pass tf32 (close to fp32 accuracy). Under the interpreter bf16 dots are
    wrong, so fp32 is used there."""
    dtypes = {t.dtype for t in tensors}
    if dtypes == {torch.float8_e4m3fn}:
        return tl.float8e4nv, "tf32"
    dtypes.discard(torch.float8_e4m3fn)
    if len(dtypes) == 1 and not INTERPRET:
        dtype = dtypes.pop()
        if dtype == torch.bfloat16:
            return tl.bfloat16, "tf32"
        if dtype == torch.float16:
            return tl.float16, "tf32"
    return tl.float32, "tf32x3"


def dot_block_d(dim: int, dot_dtype: tl.dtype) -> int:
    """Padded head dim (the dot's K): a power of two, at least 16, and 32 for 8-bit operands
    (the smallest K the GPU's FP8 matrix instructions take)."""
    return max(32 if dot_dtype.primitive_bitwidth == 8 else 16, next_pow2(dim))
