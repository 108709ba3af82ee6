"""Key addressing shared by the kernels that read keys either from a contiguous [B, T, ...] tensor
or from a paged cache [P, PAGE, ...] (vLLM/SGLang layout): position n of sequence b lives in
page block_table[b, n // PAGE], slot n % PAGE. Both layouts are addressed as
outer * stride_outer + inner * stride_inner, so a kernel keeps one load for either. Also the
device-side check of a block table, its lengths and the scales of the keys they make visible
(one program per sequence), which the paged ops run instead of host checks."""
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


@triton.jit
def checked_paging_kernel(table_ptr, len_ptr, table_out_ptr, len_out_ptr, flag_ptr, scale_ptr,
                          pages, num_pages, pages_per_split, stride_tb, stride_ob, stride_sp,
                          stride_ss, PAGE: tl.constexpr, BLOCK: tl.constexpr,
                          HAS_SCALE: tl.constexpr, SCALE_PAGES: tl.constexpr,
                          SCALE_SLOTS: tl.constexpr):
    """Program (b, 0): sequence b's length clamped into [0, pages * PAGE] and the page ids of
    its used pages clamped into [0, num_pages) (the rest copied as they are), flag[b, 0] set when
    either was out of range. With a k_scale [num_pages, PAGE], program (b, s) also checks the
    scales of the keys [0, length) on its share of the pages (pages_per_split from s *
    pages_per_split), flag[b, s] set when one is not finite and > 0 (device_checks' rule; free
    pages and the unwritten slots of the last page may hold anything). The splits spread the
    scale reads (16 MiB for 64 sequences of 64K keys) over the card."""
    b = tl.program_id(0)
    split = tl.program_id(1)
    length = tl.load(len_ptr + b).to(tl.int64)
    capacity = pages * PAGE  # (no .to() on an int argument: Triton may pass a 1 as a constexpr)
    bad = ((length < 0) | (length > capacity)) & (split == 0)  # (reported by split 0 alone)
    if split == 0:
        n = tl.arange(0, BLOCK)
        for p0 in range(0, pages, BLOCK):
            column = p0 + n
            inside = column < pages
            entry = tl.load(table_ptr + b.to(tl.int64) * stride_tb + column, mask=inside,
                            other=0)
            used = inside & (column.to(tl.int64) * PAGE < length)
            wrong = used & ((entry < 0) | (entry >= num_pages))
            bad = bad | (tl.max(wrong.to(tl.int32), axis=0) > 0)
            clamped = tl.minimum(tl.maximum(entry, 0), num_pages - 1)
            tl.store(table_out_ptr + b.to(tl.int64) * stride_ob + column, clamped, mask=inside)
    length = tl.minimum(tl.maximum(length, 0), capacity)
    if split == 0:
        tl.store(len_out_ptr + b, length)
    if HAS_SCALE:
        # [pages, slots] tiles of SCALE_PAGES pages, so a long share takes a few wide loads
        # rather than one dependent load per page.
        row = tl.arange(0, SCALE_PAGES)
        slot = tl.arange(0, SCALE_SLOTS)
        first = split * pages_per_split
        end = tl.minimum(first + pages_per_split, (length + PAGE - 1) // PAGE)
        for p0 in range(first, end, SCALE_PAGES):
            column = p0 + row
            used = column < end
            entry = tl.load(table_ptr + b.to(tl.int64) * stride_tb + column, mask=used, other=0)
            page = tl.minimum(tl.maximum(entry, 0), num_pages - 1).to(tl.int64)
            where = (column.to(tl.int64) * PAGE)[:, None] + slot[None, :] < length
            where = where & used[:, None] & (slot < PAGE)[None, :]
            scale = tl.load(scale_ptr + page[:, None] * stride_sp + slot[None, :] * stride_ss,
                            mask=where, other=1.0)
            # NaN fails both comparisons, -inf and 0 the first, +inf the second.
            wrong = where & ~((scale > 0) & (scale < float("inf")))
            bad = bad | (tl.max(tl.max(wrong.to(tl.int32), axis=1), axis=0) > 0)
    tl.store(flag_ptr + b * tl.num_programs(1) + split, bad.to(tl.int8))
