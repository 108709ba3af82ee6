"""Index ids for the -inf slots of masked selections.

A selection row with fewer than K selectable keys ends in -inf slots. Without a mask the
selection kernels give those slots ids past the end of the query's range (candidate_topk's
tail_base), which are hidden keys, so a re-rank of the row never scores a visible key twice. A
mask can make those ids visible keys that the row already selected: MISA-hierarchical's re-rank
would then pick the same key twice. This pass, run on every masked selection, moves each row's
finite entries to its first slots (the order of a selection is unspecified) and gives its -inf
slots the first keys that the row cannot see (ranges AND mask), in key order. Rows without -inf
slots only read their values. Should a row have fewer hidden keys than -inf slots (visible keys
whose scores are NaN count as neither), the remaining slots keep the ids they had."""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import wrap_triton
import triton
import triton.language as tl

from ..common import (INTERPRET, INTERPRETED, load_mask_tile, mask_operand, next_pow2,
                      store_int64_where, visible_range)


@triton.jit
def hidden_tails_kernel(val_ptr, idx_ptr, mask_ptr, ks_ptr, ke_ptr, rows, S, T, K,
                        stride_vb, stride_vr, stride_rb, stride_rs,
                        stride_mb, stride_ms, stride_mt,
                        CAUSAL: tl.constexpr, RAGGED: tl.constexpr, MASK_KIND: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    r = tl.program_id(0)
    b = r // rows
    t = r % rows
    row = b.to(tl.int64) * stride_vb + t.to(tl.int64) * stride_vr
    slots = tl.arange(0, BLOCK_K)
    slot_ok = slots < K
    values = tl.load(val_ptr + row + slots, mask=slot_ok, other=float("-inf"))
    member = slot_ok & (values > float("-inf"))
    n_member = tl.sum(member.to(tl.int32), axis=0)
    needs = K - n_member
    if needs > 0:
        ids = tl.load(idx_ptr + row + slots, mask=slot_ok, other=0)
        empty = slot_ok & ~member
        position = tl.where(member, tl.cumsum(member.to(tl.int32), axis=0) - 1,
                            n_member + tl.cumsum(empty.to(tl.int32), axis=0) - 1)
        # Every warp has read the row before any warp overwrites it.
        tl.debug_barrier()
        tl.store(val_ptr + row + position, values, mask=slot_ok)
        tl.store(idx_ptr + row + position, ids, mask=slot_ok)
        tl.debug_barrier()
        lo, hi = visible_range(b, t, True, ks_ptr, ke_ptr, stride_rb, stride_rs, T, S, CAUSAL,
                               RAGGED)
        found = n_member * 0
        for s0 in range(0, T, BLOCK_N):
            if found < needs:
                keys = s0 + tl.arange(0, BLOCK_N)
                in_range = (keys < T) & (keys >= lo) & (keys < hi)
                visible, _ = load_mask_tile(mask_ptr, b, t, keys, in_range, stride_mb,
                                            stride_ms, stride_mt, MASK_KIND)
                hidden = (keys < T) & ~visible
                ordinal = found + tl.cumsum(hidden.to(tl.int32), axis=0) - 1
                target = idx_ptr + row + n_member + ordinal
                keep = hidden & (ordinal < needs)
                # In PTX on the GPU: with tl.store, Inductor's analysis sees the address depend
                # on the mask and ranges and takes them for written (copying them first).
                if INTERPRETED:
                    tl.store(target, keys.to(tl.int64), mask=keep)
                    counted = hidden.to(tl.int32)
                else:
                    counted = store_int64_where(target, keys.to(tl.int64), keep,
                                                hidden.to(tl.int32))
                found += tl.sum(counted, axis=0)


def hidden_tails(values: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor, T: int,
                 causal: bool, key_start: Optional[torch.Tensor],
                 key_end: Optional[torch.Tensor]) -> None:
    """In place on a masked selection values fp32 / indices int64 [B, S, K] (unit column
    stride, the same strides): see the module docstring."""
    batch, queries, K = values.shape
    assert values.stride() == indices.stride() and values.stride(-1) == 1
    mask_t, kind, mstr = mask_operand(mask, batch, queries, T)
    ragged = key_start is not None
    rstr = (key_start.stride(0), key_start.stride(1)) if ragged else (0, 0)
    block_k = next_pow2(max(K, 16))
    wrap_triton(hidden_tails_kernel)[(batch * queries,)](
        values, indices, mask_t, key_start if ragged else mask_t,
        key_end if ragged else mask_t, queries, queries, T, K,
        values.stride(0), values.stride(1), *rstr, *mstr,
        CAUSAL=causal, RAGGED=ragged, MASK_KIND=kind, BLOCK_K=block_k,
        BLOCK_N=16 if INTERPRET else 1024,
        num_warps=1 if INTERPRET else max(4, min(16, block_k // 1024)))
