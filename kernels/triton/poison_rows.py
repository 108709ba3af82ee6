"""Poisons the rows of an op's output whose inputs were out of range (launch/device_checks.py):
ids -1 and, for a selection, values NaN. One program a row reads the row's fault flag and writes
only when it is set, so the usual call (no fault) reads the flags alone, where a masked fill
reads and writes all of the output (8192 x 2048 values and ids: 0.15 ms on an H100)."""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import wrap_triton
import triton
import triton.language as tl

from .common import next_pow2


@triton.jit
def poison_rows_kernel(values_ptr, ids_ptr, faults_ptr, rows_per_batch, width,
                       stride_fb, stride_fs, stride_vb, stride_vs, stride_ib, stride_is,
                       HAS_VALUES: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    b = (r // rows_per_batch).to(tl.int64)
    s = (r % rows_per_batch).to(tl.int64)
    if tl.load(faults_ptr + b * stride_fb + s * stride_fs) != 0:
        for c0 in range(0, width, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            if HAS_VALUES:
                tl.store(values_ptr + b * stride_vb + s * stride_vs + cols, float("nan"),
                         mask=cols < width)
            tl.store(ids_ptr + b * stride_ib + s * stride_is + cols, -1, mask=cols < width)


def _row_strides(t: torch.Tensor) -> tuple[int, int]:
    """(batch, row) strides of a tensor with one or two leading dims (one: a single batch)."""
    return (0, t.stride(0)) if t.dim() == 2 else (t.stride(0), t.stride(1))


def poison_rows(values: Optional[torch.Tensor], ids: torch.Tensor, faults: torch.Tensor
                ) -> None:
    """In place: ids -1 and values NaN in the rows where faults (bool) is set. ids [..., width]
    and values (fp32, the same shape) have one or two leading dims and unit column stride;
    faults broadcasts to the leading dims."""
    lead, width = ids.shape[:-1], ids.shape[-1]
    if not 1 <= len(lead) <= 2:
        raise ValueError(f"poison_rows: ids of shape {tuple(ids.shape)}; one or two leading "
                         "dims are allowed")
    assert ids.stride(-1) == 1 and (values is None or
                                    (values.shape == ids.shape and values.stride(-1) == 1))
    flags = faults.expand(lead)
    if flags.numel() == 0 or width == 0:
        return
    # Passed as bool (Triton loads it as int1): a dtype view of it would not lower in Inductor.
    flags = flags[None] if flags.dim() == 1 else flags
    wrap_triton(poison_rows_kernel)[(flags.numel(),)](
        values if values is not None else ids, ids, flags, flags.shape[1], width,
        flags.stride(0), flags.stride(1), *_row_strides(values if values is not None else ids),
        *_row_strides(ids), HAS_VALUES=values is not None, BLOCK=min(1024, next_pow2(width)))
