"""Vectorised torch implementations of the misa ops, used on CPU (and on any device without a
Triton kernel). Queries are processed in chunks so that the extra memory is O(chunk x T) (times
the head count for the per-head logits), never O(S x T). FP8 inputs and dequantization scales
are applied once, up front (dequantize); the math after that is the same fp32 math."""
from __future__ import annotations

import torch

from .validation import QUANTIZED_DTYPES
from .visibility import block_visibility, chunk_visibility, pooled_keys

NEG_INF = float("-inf")
# Elements of fp32 scratch a chunk may use (the [B, c, H, T] per-head logits dominate): 64 MiB.
CHUNK_BUDGET_ELEMENTS = 1 << 24


def query_chunks(queries: int, per_query_elements: int, chunk: int):
    """Slices covering [0, queries); `chunk` > 0 fixes the size, 0 derives it from the budget."""
    if chunk <= 0:
        chunk = max(1, CHUNK_BUDGET_ELEMENTS // max(1, per_query_elements))
    for start in range(0, queries, chunk):
        yield slice(start, min(start + chunk, queries))


def dequantize(q, k, q_scale=None, k_scale=None):
    """The real values q.float() * q_scale[..., None] and k.float() * k_scale[..., None]. FP8
    tensors (torch has no matmul or gather for them) are upcast to fp32; other inputs without a
    scale come back unchanged (the math upcasts them chunk by chunk)."""
    return _real_values(q, q_scale), _real_values(k, k_scale)


def _real_values(x, scale):
    if x.dtype in QUANTIZED_DTYPES:
        x = x.float()
    # Tensor-tensor promotion computes a 16-bit x times the fp32 scale in fp32.
    return x if scale is None else x * scale[..., None]


def _finish_scores(scores, visible, bias, scale):
    scores = scores * scale
    if bias is not None:
        scores = scores + bias
    # NaN never wins a selection: it ranks with the hidden keys.
    scores = torch.nan_to_num(scores, nan=NEG_INF)
    return scores.masked_fill_(~visible, NEG_INF)


def dense_topk(q, k, w, k_top, scale, causal, key_start, key_end, mask, chunk, q_scale=None,
               k_scale=None):
    q, k = dequantize(q, k, q_scale, k_scale)
    batch, queries, heads, _ = q.shape
    keys = k.shape[1]
    top = min(k_top, keys)
    values = torch.empty(batch, queries, top, dtype=torch.float32, device=q.device)
    indices = torch.empty(batch, queries, top, dtype=torch.int64, device=q.device)
    k32 = k.float()
    for rows in query_chunks(queries, batch * heads * keys, chunk):
        scores = _all_key_scores(q[:, rows], k32, w[:, rows])
        visible, bias = chunk_visibility(rows, batch, queries, keys, q.device, causal,
                                         key_start, key_end, mask)
        scores = _finish_scores(scores, visible, bias, scale)
        values[:, rows], indices[:, rows] = scores.topk(top, dim=-1)
    return values, indices


def _all_key_scores(q_rows, k32, w_rows):
    """sum_j w[.,j] * ReLU(q[.,j] . k) for every key: [B, c, T] fp32 (one GEMM per chunk)."""
    logits = torch.einsum("bchd,btd->bcht", q_rows.float(), k32).relu_()
    return torch.einsum("bcht,bch->bct", logits, w_rows.float())


def _candidate_scores(q_rows, k32, w_rows, safe, gather_keys):
    """The index score of each candidate key [B, c, C]. Unless the candidates are a small part of
    the keys (gather_keys), scoring every key with one GEMM and picking the candidates' scores is
    faster than gathering a [B, c, C, D] block of keys per query."""
    if not gather_keys:
        return _all_key_scores(q_rows, k32, w_rows).gather(-1, safe)
    batch_ids = torch.arange(k32.shape[0], device=k32.device)[:, None, None]
    cand_keys = k32[batch_ids, safe]  # [B, c, C, D]
    logits = torch.einsum("bchd,bcnd->bchn", q_rows.float(), cand_keys).relu_()
    return torch.einsum("bchn,bch->bcn", logits, w_rows.float())


def route_heads(q, k, w, active_heads, block_size, router, causal, key_start, key_end, mask, chunk,
                q_scale=None, k_scale=None, kbar=None):
    """kbar: the pooled keys when the caller keeps them (the paged op's cache)."""
    q, k = dequantize(q, k, q_scale, k_scale)
    batch, queries, heads, _ = q.shape
    keys = k.shape[1]
    if router == "qnorm":
        scores = torch.nan_to_num(q.float().norm(dim=-1), nan=NEG_INF)
        return scores.topk(active_heads, dim=-1).indices
    if kbar is None:
        kbar = pooled_keys(k, block_size)
    num_blocks = kbar.shape[1]
    chosen = torch.empty(batch, queries, active_heads, dtype=torch.int64, device=q.device)
    for rows in query_chunks(queries, batch * (heads * num_blocks + keys), chunk):
        visible, _ = chunk_visibility(rows, batch, queries, keys, q.device, causal,
                                      key_start, key_end, mask)
        blocks = block_visibility(visible, block_size).float()  # [B, c, nb]
        per_block = torch.einsum("bchd,bnd->bchn", q[:, rows].float(), kbar).relu_()
        r = torch.einsum("bchn,bcn->bch", per_block, blocks) * w[:, rows].float().abs()
        chosen[:, rows] = torch.nan_to_num(r, nan=NEG_INF).topk(active_heads, dim=-1).indices
    return chosen


def gather_heads(q, w, heads):
    """q [B,S,H,D], w [B,S,H], heads [B,S,h] -> q [B,S,h,D], w [B,S,h] (q keeps its dtype)."""
    heads = heads.long()
    # gather has no FP8 kernels: one-byte dtypes are moved as raw bytes.
    source = q.view(torch.uint8) if q.element_size() == 1 else q
    q_routed = source.gather(2, heads[..., None].expand(*heads.shape, q.shape[-1]))
    return q_routed.view(q.dtype), w.gather(2, heads)


def routed_topk(q, k, w, heads, k_top, scale, causal, key_start, key_end, mask, chunk,
                q_scale=None, k_scale=None):
    q, k = dequantize(q, k, q_scale, k_scale)
    # The key is shared by all heads, so routed scoring is the dense indexer on gathered heads.
    q_routed, w_routed = gather_heads(q, w, heads)
    return dense_topk(q_routed, k, w_routed, k_top, scale, causal, key_start, key_end, mask, chunk)


def rerank_topk(q, k, w, candidates, k_top, scale, causal, key_start, key_end, mask, chunk,
                q_scale=None, k_scale=None):
    """Exact all-head scores of the candidate keys only; candidates outside [0, T) are invalid."""
    q, k = dequantize(q, k, q_scale, k_scale)
    batch, queries, heads, dim = q.shape
    keys = k.shape[1]
    width = candidates.shape[-1]
    top = min(k_top, keys)
    values = torch.full((batch, queries, top), NEG_INF, dtype=torch.float32, device=q.device)
    indices = torch.zeros(batch, queries, top, dtype=torch.int64, device=q.device)
    taken = min(top, width)
    k32 = k.float()
    # Measured on a 2-core CPU (H=64, D=128): gathering the candidates' keys wins at C = T/4 (84 vs
    # 140 ms a chunk) and loses at C = T/2, where one GEMM over all keys is cheaper.
    gather_keys = 2 * width < keys
    per_query = width * (heads + dim) if gather_keys else heads * keys
    for rows in query_chunks(queries, batch * (per_query + keys), chunk):
        cand = candidates[:, rows].long()
        valid = (cand >= 0) & (cand < keys)
        safe = cand.clamp(0, keys - 1)
        scores = _candidate_scores(q[:, rows], k32, w[:, rows], safe, gather_keys)
        visible, bias = chunk_visibility(rows, batch, queries, keys, q.device, causal,
                                         key_start, key_end, mask)
        cand_visible = visible.gather(-1, safe) & valid
        cand_bias = None if bias is None else bias.gather(-1, safe)
        scores = _finish_scores(scores, cand_visible, cand_bias, scale)
        best, slot = scores.topk(taken, dim=-1)
        values[:, rows, :taken] = best
        indices[:, rows, :taken] = safe.gather(-1, slot)
    return values, indices


def hisa_candidates(q, k, w, block_size, num_blocks, causal, key_start, key_end, mask, chunk,
                    q_scale=None, k_scale=None):
    """Key indices [B, S, min(min(m, nb) * block, T)] of the kept blocks; -1 past the last key.
    When the m blocks are all nb blocks, every key: 0..T-1 (see every_key_kept)."""
    batch, queries = q.shape[:2]
    keys = k.shape[1]
    if every_key_kept(keys, block_size, num_blocks):
        return all_key_ids(batch, queries, keys, q.device)
    q, k = dequantize(q, k, q_scale, k_scale)
    heads = q.shape[2]
    kbar = pooled_keys(k, block_size)
    total_blocks = kbar.shape[1]
    kept = min(num_blocks, total_blocks)
    out = torch.empty(batch, queries, kept * block_size, dtype=torch.int64, device=q.device)
    offsets = torch.arange(block_size, device=q.device)
    for rows in query_chunks(queries, batch * (heads * total_blocks + keys), chunk):
        visible, _ = chunk_visibility(rows, batch, queries, keys, q.device, causal,
                                      key_start, key_end, mask)
        blocks_visible = block_visibility(visible, block_size)
        per_block = torch.einsum("bchd,bnd->bchn", q[:, rows].float(), kbar).relu_()
        beta = torch.einsum("bchn,bch->bcn", per_block, w[:, rows].float())
        beta = torch.nan_to_num(beta, nan=NEG_INF).masked_fill_(~blocks_visible, NEG_INF)
        beta = force_first_and_last_blocks(beta, blocks_visible)
        chosen = beta.topk(kept, dim=-1).indices  # [B, c, kept]
        key_ids = (chosen[..., None] * block_size + offsets).flatten(-2)
        out[:, rows] = torch.where(key_ids < keys, key_ids, -1)
    return out


def every_key_kept(keys: int, block_size: int, num_blocks: int) -> bool:
    """HISA keeps every block when num_blocks >= ceil(T / block_size): its candidates are then
    all T keys whatever the scores, and listing them block by block would size the output by the
    block (block_size=10**9 with T=10 would ask for 10**9 ids per query)."""
    return num_blocks * block_size >= keys


def all_key_ids(batch: int, queries: int, keys: int, device) -> torch.Tensor:
    """int64 [B, S, T]: every key id, in order, for every query."""
    return torch.arange(keys, device=device).expand(batch, queries, keys).contiguous()


def force_first_and_last_blocks(beta, blocks_visible):
    """HISA always keeps the first visible block (the attention sink) and the last one (the
    query's own block)."""
    total = blocks_visible.shape[-1]
    first = blocks_visible.int().argmax(-1, keepdim=True)
    last = total - 1 - blocks_visible.flip(-1).int().argmax(-1, keepdim=True)
    forced = torch.where(blocks_visible.any(-1, keepdim=True), float("inf"), NEG_INF)
    forced = forced.to(beta.dtype)
    return beta.scatter(-1, first, forced).scatter(-1, last, forced)


def paged_decode_topk(q, k_cache, w, block_table, seq_lens, k_top, active_heads, block_size,
                      scale, q_scale=None, k_scale=None, pooled_keys=None):
    """One query per sequence against a paged key cache: the sequence's pages gathered into
    contiguous keys, then dense_topk (active_heads = 0) or route_heads + routed_topk, with keys
    [0, seq_len) visible; the router reads `pooled_keys` (paged_pooled_keys) when given. Returns
    (values, indices) [B, min(k_top, pages * page)]."""
    k, k_scale = gather_pages(k_cache, block_table, seq_lens, k_scale)
    key_end = seq_lens.long()[:, None]
    visibility = (False, torch.zeros_like(key_end), key_end, None, 0)
    q, w = q[:, None], w[:, None]
    q_scale = None if q_scale is None else q_scale[:, None]
    if active_heads == 0:
        values, indices = dense_topk(q, k, w, k_top, scale, *visibility, q_scale, k_scale)
    else:
        heads = _route_each_sequence(q, k, w, seq_lens, active_heads, block_size, q_scale,
                                     k_scale, pooled_keys)
        values, indices = routed_topk(q, k, w, heads, k_top, scale, *visibility, q_scale,
                                      k_scale)
    return values[:, 0], indices[:, 0]


def gather_pages(k_cache, block_table, seq_lens, k_scale=None):
    """k [B, pages * page, D] (and k_scale [B, pages * page]) from a paged cache [P, page, D]
    (k_scale [P, page]). Table entries past a sequence's last page may hold anything (-1
    padding): page 0 stands in for them, and their keys are past seq_len, hence hidden."""
    batch, pages = block_table.shape
    page = k_cache.shape[1]
    used = torch.arange(pages, device=block_table.device) * page < seq_lens[:, None]
    table = torch.where(used, block_table.long(), 0)
    # Indexing has no FP8 kernels: one-byte dtypes are moved as raw bytes.
    source = k_cache.view(torch.uint8) if k_cache.element_size() == 1 else k_cache
    k = source[table].view(k_cache.dtype).reshape(batch, pages * page, k_cache.shape[2])
    if k_scale is not None:
        k_scale = k_scale[table].reshape(batch, pages * page)
    return k, k_scale


def paged_pooled_keys(k_cache, block_table, seq_lens, block_size, k_scale=None, pooled=None,
                      first_token=None):
    """fp32 [B, ceil(pages * page / block_size), D]: the mean of each block of each sequence's
    keys [0, seq_len) (a partial last block averages its written keys; blocks past it are 0).
    With `pooled` and `first_token` [B]: `pooled`, its blocks from first_token // block_size on
    recomputed (the earlier blocks are the caller's promise: unchanged since `pooled`)."""
    k, k_scale = gather_pages(k_cache, block_table, seq_lens, k_scale)
    k = _real_values(k, k_scale)
    batch, keys, dim = k.shape
    num_blocks = -(-keys // block_size)
    out = torch.zeros(batch, num_blocks, dim, dtype=torch.float32, device=k.device)
    for b, length in enumerate(seq_lens.tolist()):
        if length:
            out[b, :-(-length // block_size)] = pooled_keys(k[b:b + 1, :length], block_size)[0]
    if pooled is None:
        return out
    blocks = torch.arange(num_blocks, device=k.device)
    recomputed = blocks >= (first_token.long() // block_size)[:, None]
    return torch.where(recomputed[..., None], out, pooled.float())


def _route_each_sequence(q, k, w, seq_lens, active_heads, block_size, q_scale, k_scale,
                         kbar=None):
    """heads [B, 1, h]: route_heads on each sequence's own keys [0, seq_len), so that its last
    partial block averages only written keys (route_heads on all pages * page gathered keys
    would pool the unwritten slots past seq_len into it). A sequence without keys selects
    nothing whatever its heads: it gets heads 0..h-1. kbar: cached pooled keys [B, nb, D] (its
    first ceil(seq_len / block_size) blocks are the sequence's)."""
    batch = q.shape[0]
    heads = torch.arange(active_heads, device=q.device).expand(batch, 1, active_heads).clone()
    for b, length in enumerate(seq_lens.tolist()):
        if length == 0:
            continue
        one = slice(b, b + 1)
        heads[one] = route_heads(q[one], k[one, :length], w[one], active_heads, block_size,
                                 "score", False, None, None, None, 0,
                                 None if q_scale is None else q_scale[one],
                                 None if k_scale is None else k_scale[one, :length],
                                 None if kbar is None
                                 else kbar[one, :-(-length // block_size)].float())
    return heads
