"""Key addressing shared by the kernels that read keys either from a contiguous [B, T, ...] tensor
or from a paged cache [P, PAGE, ...] (vLLM/SGLang layout): position n of sequence b lives in
page block_table[b, n // PAGE], slot n % PAGE. Both layouts are addressed as
outer * stride_outer + inner * stride_inner, so a kernel keeps one load for either."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def key_location(b, keys, mask, table_ptr, stride_tb, PAGED: tl.constexpr, PAGE: tl.constexpr):
    """(outer, inner) of the keys of sequence b: (b, key) in a [B, T, ...] tensor, or (page,
    slot) in a paged cache. The block table is read only where mask holds (entries past a
    sequence's pages may hold anything, e.g. -1 padding)."""
    if PAGED:
        page = tl.load(table_ptr + b.to(tl.int64) * stride_tb + keys // PAGE, mask=mask, other=0)
        outer = page.to(tl.int64)
        inner = keys % PAGE
    else:
        outer = b.to(tl.int64)
        inner = keys
    return outer, inner
