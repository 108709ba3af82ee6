"""The routed op's inputs in one launch: each query's routed heads gathered into contiguous
q [B, S, h, D] (q's dtype, FP8 included) and w [B, S, h] fp32 (times q_scale when given), plus
one fault flag per query, so MISA's scoring is the dense kernel over h heads with plain strided
loads. It replaces 7 small torch kernels a routed_topk call (range check, clamp, the two
gathers; 14 with q_scale: also the fold and the scale check), whose launches made short plain
calls host-bound.

A query's fault is set when one of its head ids lies outside [0, H) (route_heads marks the rows
it poisons with -1) or, with q_scale, when an entry of its whole q_scale row [H] is not finite
and > 0 (device_checks.scale_faults' rule). Head ids are clamped before they address anything,
so a bad id reads a real head; the caller poisons the row."""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import wrap_triton
import triton
import triton.language as tl

from ..common import INTERPRET, next_pow2

# Bounds the q tile a program holds in registers; 8 routed heads x 128 dims move in one step.
ROW_STEP = 1024


@triton.jit
def routed_inputs_kernel(
    q_ptr, w_ptr, heads_ptr, qscale_ptr, q_out_ptr, w_out_ptr, fault_ptr,
    S, H, HS, D,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_wb, stride_ws, stride_wh,
    stride_hb, stride_hs, stride_hh,
    stride_sb, stride_ss, stride_sh,
    HAS_QSCALE: tl.constexpr, BLOCK_HS: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Query row = b * S + t: its HS head ids, its gathered q and w rows and its fault flag."""
    row = tl.program_id(0)
    b = (row // S).to(tl.int64)
    t = (row % S).to(tl.int64)
    slots = tl.arange(0, BLOCK_HS)
    slot_ok = slots < HS
    ids = tl.load(heads_ptr + b * stride_hb + t * stride_hs + slots * stride_hh, mask=slot_ok,
                  other=0)
    # Compared in the ids' own width: an int64 id past 2^31 must not wrap into range.
    bad = tl.max((slot_ok & ((ids < 0) | (ids >= H))).to(tl.int32), axis=0) > 0
    ids = tl.minimum(tl.maximum(ids, 0), H - 1).to(tl.int64)

    w_j = tl.load(w_ptr + b * stride_wb + t * stride_ws + ids * stride_wh, mask=slot_ok,
                  other=0.0).to(tl.float32)
    if HAS_QSCALE:
        scale_row = qscale_ptr + b * stride_sb + t * stride_ss
        # The fold: the same fp32 product as torch's w * q_scale (a 16-bit w promoted).
        w_j = w_j * tl.load(scale_row + ids * stride_sh, mask=slot_ok, other=1.0)
        # Every scale of the row counts, not only the routed heads'. NaN fails `> 0`, -inf
        # too, +inf fails `< inf`.
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            col_ok = cols < H
            s = tl.load(scale_row + cols * stride_sh, mask=col_ok, other=1.0)
            wrong = col_ok & ~((s > 0.0) & (s < float("inf")))
            bad = bad | (tl.max(wrong.to(tl.int32), axis=0) > 0)
    tl.store(w_out_ptr + row.to(tl.int64) * HS + slots, w_j, mask=slot_ok)

    # q moves as loaded (no conversion: FP8 bytes stay bit-exact).
    src = q_ptr + b * stride_qb + t * stride_qs + ids[:, None] * stride_qh
    dst = q_out_ptr + (row.to(tl.int64) * HS + slots[:, None]) * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        ok = slot_ok[:, None] & (d < D)[None, :]
        tl.store(dst + d[None, :], tl.load(src + d[None, :] * stride_qd, mask=ok), mask=ok)
    tl.store(fault_ptr + row, bad)


def routed_inputs(q: torch.Tensor, w: torch.Tensor, heads: torch.Tensor,
                  q_scale: Optional[torch.Tensor] = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q_routed [B, S, h, D] q's dtype, w_routed [B, S, h] fp32, faults [B, S] bool) for q
    [B, S, H, D], w [B, S, H], heads [B, S, h] (int32 / int64, any values) and q_scale
    [B, S, H] fp32 or None; any strides. w_routed is w (times q_scale) of the clamped ids; the
    scoring kernels read w as fp32 anyway, so an unscaled 16-bit w scores bit-identically."""
    batch, queries, num_heads, dim = q.shape
    slots = heads.shape[-1]
    q_routed = torch.empty(batch, queries, slots, dim, dtype=q.dtype, device=q.device)
    w_routed = torch.empty(batch, queries, slots, dtype=torch.float32, device=q.device)
    faults = torch.empty(batch, queries, dtype=torch.bool, device=q.device)
    block_hs = next_pow2(slots)
    block_d = min(next_pow2(dim), max(16, ROW_STEP // block_hs))
    scale_strides = (0, 0, 0) if q_scale is None else q_scale.stride()
    wrap_triton(routed_inputs_kernel)[(batch * queries,)](
        q, w, heads, w if q_scale is None else q_scale, q_routed, w_routed, faults,
        queries, num_heads, slots, dim, *q.stride(), *w.stride(), *heads.stride(),
        *scale_strides, HAS_QSCALE=q_scale is not None, BLOCK_HS=block_hs, BLOCK_D=block_d,
        BLOCK_H=min(next_pow2(num_heads), 1024),
        num_warps=1 if INTERPRET else max(1, min(4, block_hs * block_d // 256)))
    return q_routed, w_routed, faults
