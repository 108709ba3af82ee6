"""Which key blocks each query can see when the op has a mask: a block is visible to a query when
any key of the block is (causal AND ragged range AND mask), as visibility.block_visibility says.
The router (blocks of block_size keys) and HISA's block filter (pooled keys) score per block, so
they read the mask once, here, through its strides, and then take this small [B, S, ceil(T /
block)] bool tensor as a bool mask over block ids. Without a mask they need none of it: a block's
visibility is then its overlap with the query's range, which the kernels test directly."""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import wrap_triton
import triton
import triton.language as tl

from ..common import INTERPRET, load_mask_tile, mask_operand, visible_range


@triton.jit
def block_visibility_kernel(mask_ptr, ks_ptr, ke_ptr, out_ptr, S, T, block,
                            stride_rb, stride_rs, stride_mb, stride_ms, stride_mt,
                            stride_ob, stride_os,
                            CAUSAL: tl.constexpr, RAGGED: tl.constexpr,
                            MASK_KIND: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    blk = tl.program_id(1)
    b = tl.program_id(2)
    t = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = t < S
    lo, hi = visible_range(b, t, row_ok, ks_ptr, ke_ptr, stride_rb, stride_rs, T, S, CAUSAL,
                           RAGGED)
    # Walk only the keys of the block that some row's range leaves visible (causal rows stop at
    # the diagonal), in chunks that start BLOCK_N-aligned within the block.
    block_lo = blk * block
    limit = tl.minimum(block_lo + block, T)
    start = tl.maximum(block_lo, tl.min(tl.where(row_ok, lo, T), axis=0))
    end = tl.minimum(limit, tl.max(tl.where(row_ok, hi, 0), axis=0))
    first = block_lo + ((start - block_lo) // BLOCK_N) * BLOCK_N
    seen = tl.zeros([BLOCK_M], dtype=tl.int32)
    for s0 in range(first, end, BLOCK_N):
        keys = s0 + tl.arange(0, BLOCK_N)
        in_range = (keys[None, :] >= lo[:, None]) & (keys[None, :] < hi[:, None])
        # A chunk inside the block and the tensor is loaded under a mask that is constant along
        # the keys (the rows only), so the loads vectorize (16 bytes per thread, not one); the
        # ranges are applied after the load. Only a block's or the tensor's ragged end takes the
        # per-key mask.
        if s0 + BLOCK_N <= limit:
            # (Each branch loads: a mask merged after the branch would lose its constancy.)
            visible, _ = load_mask_tile(mask_ptr, b, t[:, None], keys[None, :],
                                        tl.broadcast_to(row_ok[:, None], [BLOCK_M, BLOCK_N]),
                                        stride_mb, stride_ms, stride_mt, MASK_KIND)
        else:
            visible, _ = load_mask_tile(mask_ptr, b, t[:, None], keys[None, :],
                                        row_ok[:, None] & (keys < limit)[None, :],
                                        stride_mb, stride_ms, stride_mt, MASK_KIND)
        seen = tl.maximum(seen, tl.max((visible & in_range).to(tl.int32), axis=1))
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + t.to(tl.int64) * stride_os + blk,
             seen.to(tl.uint8), mask=row_ok)


def block_visibility(mask: torch.Tensor, batch: int, queries: int, T: int, block: int,
                     causal: bool, key_start: Optional[torch.Tensor],
                     key_end: Optional[torch.Tensor]) -> torch.Tensor:
    """uint8 [B, S, ceil(T / block)], nonzero where block n is visible to query t: when a key of
    [n * block, (n + 1) * block) is visible to it; `mask` (bool or additive) is any shape
    broadcastable to [B, S, T]. uint8, not bool: Inductor cannot lower a bool -> uint8 view of a
    fresh buffer, and the kernels read bool masks as bytes anyway."""
    n_blocks = triton.cdiv(T, block)
    out = torch.empty(batch, queries, n_blocks, dtype=torch.uint8, device=mask.device)
    mask_t, kind, mstr = mask_operand(mask, batch, queries, T)
    ragged = key_start is not None
    rstr = (key_start.stride(0), key_start.stride(1)) if ragged else (0, 0)
    # Chunks no wider than the block (a power of two at most 128), so that the chunks of a
    # block of 2^n keys are all whole and load vectorized.
    block_n = 16 if INTERPRET else max(16, min(128, 1 << (block.bit_length() - 1)))
    block_m = 16 if INTERPRET else 32
    grid = (triton.cdiv(queries, block_m), n_blocks, batch)
    wrap_triton(block_visibility_kernel)[grid](
        mask_t, key_start if ragged else mask_t, key_end if ragged else mask_t,
        out, queries, T, block, *rstr, *mstr, out.stride(0), out.stride(1),
        CAUSAL=causal, RAGGED=ragged, MASK_KIND=kind, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=1 if INTERPRET else 4)
    return out
