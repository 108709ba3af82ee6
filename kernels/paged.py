"""misa::paged_decode_topk: decode (one query per sequence) over a paged key cache, the layout
of vLLM and SGLang, for the dense indexer and MISA.

  q [B,H,D], w [B,H]        the step's query of each sequence
  k_cache [P, page, D]      every sequence's index keys, in pages of `page` tokens
  block_table [B, pages]    int32/int64: position n of sequence b is k_cache[block_table[b, n //
                            page], n % page]; entries past the sequence's pages are never read
  seq_lens [B]              int32/int64 in [0, pages * page]: sequence b sees keys [0, seq_len)
  active_heads              0: dense (all H heads); h in [1, H]: MISA with h routed heads
  block_size                router block, a multiple of page
  q_scale [B,H], k_scale [P, page]  optional fp32 dequantization scales (as in ops.py)

It returns what the contiguous ops return for the gathered keys k_cache[block_table] with
key_start = 0, key_end = seq_len (dense_topk, or route_heads + routed_topk): (values fp32,
indices int64) [B, min(k_top, pages * page)], indices being positions in the sequence. The one
refinement: the router pools each sequence's keys [0, seq_len) only, so its last partial block
averages written keys, never the unwritten slots of its last page. A sequence with seq_len 0
gets -inf everywhere.

The router's pooled keys can be kept between steps instead of re-read from every key at each
step (decode is bound by key reads, and pooling reads every key once more):

  pooled = misa.paged_pooled_keys(k_cache, block_table, seq_lens, block_size)      # once
  ...append the step's keys to the pages, seq_lens grows from old_lens...
  pooled = misa.paged_pooled_keys(k_cache, block_table, seq_lens, block_size,
                                  pooled=pooled, first_token=old_lens)           # each step
  misa.paged_decode_topk(..., active_heads=h, block_size=block_size, pooled_keys=pooled)

paged_pooled_keys recomputes only the blocks from first_token // block_size on (with the kernel
that computes every block, so the result equals a full recompute bit for bit); the caller
promises that no key before first_token changed since `pooled` was computed.

Out-of-range values (a seq_len outside [0, pages * page], a page id of a used page outside
[0, P), a q_scale or the k_scale of a visible key (slot n < seq_len) that is not finite and > 0)
raise on the CPU and in debug mode (validation.debug_checks); the scales of free pages and of
the unwritten slots of a last page are never read. On CUDA otherwise nothing is read from the
host: lengths and page ids are clamped before any key is read, and the sequence's row is
poisoned (values NaN, indices -1)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .ops import _implementation
from .validation import (FLOAT_DTYPES, INDEX_DTYPES, QUANTIZED_DTYPES, _check_dequant_scale,
                         _check_rank, check_positive_int, check_same_device, check_scale,
                         host_value_checks)

OP = "misa.paged_decode_topk"


@torch.library.custom_op("misa::paged_decode_topk", mutates_args=())
def paged_decode_topk(q: Tensor, k_cache: Tensor, w: Tensor, block_table: Tensor,
                      seq_lens: Tensor, k_top: int, active_heads: int = 0,
                      block_size: int = 1024, scale: float = 1.0,
                      q_scale: Optional[Tensor] = None,
                      k_scale: Optional[Tensor] = None,
                      pooled_keys: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Top-k keys of each sequence's decode query over its pages; see the module docstring."""
    check_paged_inputs(q, k_cache, w, block_table, seq_lens, k_top, active_heads, block_size,
                       scale, q_scale, k_scale, pooled_keys)
    return _implementation("paged_decode_topk", q.device)(q, k_cache, w, block_table, seq_lens,
        k_top, active_heads, block_size, scale, q_scale, k_scale, pooled_keys)


@paged_decode_topk.register_fake
def _(q, k_cache, w, block_table, seq_lens, k_top, active_heads=0, block_size=1024, scale=1.0,
      q_scale=None, k_scale=None, pooled_keys=None):
    check_same_device(OP, q, k_cache=k_cache, w=w, block_table=block_table, seq_lens=seq_lens,
                      q_scale=q_scale, k_scale=k_scale, pooled_keys=pooled_keys)
    top = torch.sym_min(k_top, block_table.shape[1] * k_cache.shape[1])
    shape = (q.shape[0], top)
    return q.new_empty(shape, dtype=torch.float32), q.new_empty(shape, dtype=torch.int64)


def check_paged_inputs(q, k_cache, w, block_table, seq_lens, k_top, active_heads, block_size,
                       scale, q_scale, k_scale, pooled_keys=None) -> None:
    """Layouts, dtypes, devices and ranges; raises naming the argument, its value and what is
    allowed."""
    _check_rank(OP, "q", q, 3, "[B, H, D]")
    _check_rank(OP, "w", w, 2, "[B, H]")
    batch, heads, dim = q.shape
    for name, size in (("B", batch), ("H", heads), ("D", dim)):
        if size == 0:
            raise ValueError(f"{OP}: empty input, {name}=0 (q {tuple(q.shape)}); every size "
                             "must be >= 1")
    _check_cache(OP, k_cache, block_table, seq_lens, k_scale, batch, dim, f"q {tuple(q.shape)}")
    if tuple(w.shape) != (batch, heads):
        raise ValueError(f"{OP}: w has shape {tuple(w.shape)}, expected {[batch, heads]} to "
                         f"match q {tuple(q.shape)}")
    for name, t, allowed in (("q", q, FLOAT_DTYPES + QUANTIZED_DTYPES), ("w", w, FLOAT_DTYPES)):
        if t.dtype not in allowed:
            raise TypeError(f"{OP}: {name} has dtype {t.dtype}; allowed dtypes are "
                            f"{', '.join(str(d) for d in allowed)}")
    check_same_device(OP, q, k_cache=k_cache, w=w, block_table=block_table, seq_lens=seq_lens,
                      q_scale=q_scale, k_scale=k_scale, pooled_keys=pooled_keys)
    _check_dequant_scale(OP, "q_scale", q_scale, (batch, heads), "[B, H]")
    check_positive_int(OP, "k_top", k_top)
    check_scale(OP, scale)
    if not 0 <= active_heads <= heads:
        raise ValueError(f"{OP}: active_heads={active_heads}; allowed range is [0, {heads}] "
                         "(0 = dense, all heads)")
    _check_block_size(OP, block_size, k_cache.shape[1])
    if pooled_keys is not None:
        if active_heads == 0:
            raise ValueError(f"{OP}: pooled_keys is given but active_heads=0 (dense) routes "
                             "nothing; pass pooled_keys with active_heads >= 1")
        _check_pooled(OP, "pooled_keys", pooled_keys, block_table, k_cache, block_size)
    _check_seq_lens_and_pages(OP, seq_lens, block_table, k_cache.shape[0], k_cache.shape[1],
                              k_scale)


def _check_cache(op, k_cache, block_table, seq_lens, k_scale, batch, dim, beside) -> None:
    """k_cache [P, page, D], block_table [B, pages], seq_lens [B], k_scale [P, page]."""
    _check_rank(op, "k_cache", k_cache, 3, "[P, page, D]")
    _check_rank(op, "block_table", block_table, 2, "[B, pages]")
    _check_rank(op, "seq_lens", seq_lens, 1, "[B]")
    num_pages, page, _ = k_cache.shape
    pages = block_table.shape[1]
    for name, size in (("P", num_pages), ("page", page), ("pages", pages)):
        if size == 0:
            raise ValueError(f"{op}: empty input, {name}=0 (k_cache {tuple(k_cache.shape)}, "
                             f"block_table {tuple(block_table.shape)}); every size must be >= 1")
    if k_cache.shape[2] != dim:
        raise ValueError(f"{op}: k_cache has shape {tuple(k_cache.shape)} but {beside} needs "
                         f"k_cache of shape [P, page, D={dim}]")
    for name, t, expected in (("block_table", block_table, (batch, pages)),
                              ("seq_lens", seq_lens, (batch,))):
        if tuple(t.shape) != expected:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected "
                             f"{list(expected)} to match {beside}")
    for name, t, allowed in (("k_cache", k_cache, FLOAT_DTYPES + QUANTIZED_DTYPES),
                             ("block_table", block_table, INDEX_DTYPES),
                             ("seq_lens", seq_lens, INDEX_DTYPES)):
        if t.dtype not in allowed:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; allowed dtypes are "
                            f"{', '.join(str(d) for d in allowed)}")
    _check_dequant_scale(op, "k_scale", k_scale, (num_pages, page), "[P, page]", values=False)


def _check_block_size(op, block_size, page) -> None:
    if block_size < 1 or block_size % page:
        raise ValueError(f"{op}: block_size={block_size}; must be a positive multiple of the "
                         f"page size {page}")


def _check_pooled(op, name, pooled, block_table, k_cache, block_size) -> None:
    batch, pages = block_table.shape
    expected = (batch, -(-pages * k_cache.shape[1] // block_size), k_cache.shape[2])
    if tuple(pooled.shape) != expected:
        raise ValueError(f"{op}: {name} has shape {tuple(pooled.shape)}, expected "
                         f"{list(expected)} = [B, ceil(pages * page / block_size), D] (what "
                         "misa.paged_pooled_keys returns for this cache and block_size)")
    if pooled.dtype != torch.float32:
        raise TypeError(f"{op}: {name} has dtype {pooled.dtype}; allowed: torch.float32 (what "
                        "misa.paged_pooled_keys returns)")


def _check_seq_lens_and_pages(op, seq_lens, block_table, num_pages, page, k_scale) -> None:
    # Value checks (validation.host_value_checks): on CUDA outside debug mode the launcher clamps
    # lengths and pages and poisons the rows instead (launch/paged_decode_topk.py).
    if not host_value_checks(seq_lens):
        return
    pages = block_table.shape[1]
    capacity = pages * page
    bad_len = (seq_lens < 0) | (seq_lens > capacity)
    # Only the pages a sequence uses must name a page of the cache, and only the scales of its
    # keys [0, seq_len) must be valid: a pool's free pages and the unwritten slots of a last page
    # may hold anything (a zeroed pool holds scale 0).
    position = torch.arange(capacity, device=block_table.device)
    visible = position < seq_lens[:, None]
    used = visible[:, ::page]
    bad_page = used & ((block_table < 0) | (block_table >= num_pages))
    bad_scale = torch.zeros_like(visible)
    if k_scale is not None:
        where = block_table.clamp(0, num_pages - 1).long().repeat_interleave(page, 1)
        slot = (position % page).expand_as(where)
        scales = k_scale[where, slot]
        bad_scale = visible & ~((scales > 0) & torch.isfinite(scales))
    # One host sync for all checks: decode calls are short enough for each sync to show.
    any_bad_len, any_bad_page, any_bad_scale = torch.stack(
        [bad_len.any(), bad_page.any(), bad_scale.any()]).tolist()
    if any_bad_len:
        b = int(bad_len.nonzero()[0, 0])
        raise ValueError(f"{op}: seq_lens[{b}] = {int(seq_lens[b])}; allowed range is "
                         f"[0, pages * page] = [0, {capacity}]")
    if any_bad_page:
        b, n = (int(i) for i in bad_page.nonzero()[0])
        raise ValueError(f"{op}: block_table[{b}, {n}] = {int(block_table[b, n])} but sequence "
                         f"{b} (seq_len {int(seq_lens[b])}) uses that page; allowed range is "
                         f"[0, P) = [0, {num_pages})")
    if any_bad_scale:
        b, n = (int(i) for i in bad_scale.nonzero()[0])
        p, s = int(block_table[b, n // page]), n % page
        raise ValueError(f"{op}: k_scale[{p}, {s}] = {float(k_scale[p, s])}, the scale of key "
                         f"{n} of sequence {b} (seq_len {int(seq_lens[b])}); the scales of the "
                         "keys a sequence sees must be finite and > 0 (a zero or negative scale "
                         "would change the ranking, since ReLU commutes only with positive "
                         "factors)")


POOLED_OP = "misa.paged_pooled_keys"


@torch.library.custom_op("misa::paged_pooled_keys", mutates_args=())
def paged_pooled_keys(k_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                      block_size: int = 1024, k_scale: Optional[Tensor] = None,
                      pooled: Optional[Tensor] = None,
                      first_token: Optional[Tensor] = None) -> Tensor:
    """The router's pooled keys of a paged cache, fp32 [B, ceil(pages * page / block_size), D],
    for paged_decode_topk's `pooled_keys`; with `pooled` and `first_token` [B], an update of
    `pooled` that recomputes only the blocks from first_token // block_size on (see the module
    docstring)."""
    check_pooled_inputs(k_cache, block_table, seq_lens, block_size, k_scale, pooled,
                        first_token)
    return _implementation("paged_pooled_keys", k_cache.device)(k_cache, block_table, seq_lens,
        block_size, k_scale, pooled, first_token)


@paged_pooled_keys.register_fake
def _(k_cache, block_table, seq_lens, block_size=1024, k_scale=None, pooled=None,
      first_token=None):
    check_same_device(POOLED_OP, k_cache, "k_cache", block_table=block_table,
                      seq_lens=seq_lens, k_scale=k_scale, pooled=pooled, first_token=first_token)
    blocks = -(-block_table.shape[1] * k_cache.shape[1] // block_size)
    return k_cache.new_empty((block_table.shape[0], blocks, k_cache.shape[2]),
                             dtype=torch.float32)


def check_pooled_inputs(k_cache, block_table, seq_lens, block_size, k_scale, pooled,
                        first_token) -> None:
    """Layouts, dtypes, devices and ranges of paged_pooled_keys' arguments."""
    _check_rank(POOLED_OP, "block_table", block_table, 2, "[B, pages]")
    _check_rank(POOLED_OP, "k_cache", k_cache, 3, "[P, page, D]")
    batch = block_table.shape[0]
    if batch == 0:
        raise ValueError(f"{POOLED_OP}: empty input, B=0 (block_table "
                         f"{tuple(block_table.shape)}); every size must be >= 1")
    _check_cache(POOLED_OP, k_cache, block_table, seq_lens, k_scale, batch, k_cache.shape[2],
                 f"block_table {tuple(block_table.shape)}")
    check_same_device(POOLED_OP, k_cache, "k_cache", block_table=block_table,
                      seq_lens=seq_lens, k_scale=k_scale, pooled=pooled, first_token=first_token)
    _check_block_size(POOLED_OP, block_size, k_cache.shape[1])
    if (pooled is None) != (first_token is None):
        raise ValueError(f"{POOLED_OP}: pooled and first_token come together (an update of "
                         "pooled from first_token on) or not at all (a full computation)")
    if pooled is not None:
        _check_pooled(POOLED_OP, "pooled", pooled, block_table, k_cache, block_size)
        _check_rank(POOLED_OP, "first_token", first_token, 1, "[B]")
        if tuple(first_token.shape) != (batch,):
            raise ValueError(f"{POOLED_OP}: first_token has shape {tuple(first_token.shape)}, "
                             f"expected {[batch]} to match block_table "
                             f"{tuple(block_table.shape)}")
        if first_token.dtype not in INDEX_DTYPES:
            raise TypeError(f"{POOLED_OP}: first_token has dtype {first_token.dtype}; allowed "
                            f"dtypes are {', '.join(str(d) for d in INDEX_DTYPES)}")
        if host_value_checks(first_token):
            capacity = block_table.shape[1] * k_cache.shape[1]
            bad = (first_token < 0) | (first_token > capacity)
            if bool(bad.any()):
                b = int(bad.nonzero()[0, 0])
                raise ValueError(f"{POOLED_OP}: first_token[{b}] = {int(first_token[b])}; "
                                 f"allowed range is [0, pages * page] = [0, {capacity}]")
    _check_seq_lens_and_pages(POOLED_OP, seq_lens, block_table, k_cache.shape[0],
                              k_cache.shape[1], k_scale)
