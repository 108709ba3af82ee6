"""HISA's block filter on the GPU: block-mean keys, the all-head signed block score
beta[t, b] = sum_j w[t, j] ReLU(q[t, j] . kbar[b]) (index_scores over pooled keys, a block
visible when it overlaps the query's range), the first and last visible block forced in, the
top-m blocks per query (candidate_topk), expanded to their key ids (-1 past T). The refinement is
rerank_topk over these ids. With a mask, a block is visible when any of its keys is
(block_visibility.py, the mask read once); the block scores take that as a bool mask over block
ids, and the first and last visible blocks are forced in on the small [B, rows, blocks] scores by
the torch implementation's own rule."""
from __future__ import annotations

from typing import Optional

import torch

from ...torch_impl import all_key_ids, every_key_kept, force_first_and_last_blocks
from ..scoring.block_visibility import block_visibility
from ..selection.candidate_topk import MAX_ROW, candidate_topk
from ..common import next_pow2
from ..scoring.index_scores import index_scores
from ..selection.row_topk import topk_rows
from ..scoring.router_scores import pooled_keys
from .device_checks import fold_query_scale, poison_ids, scale_faults
from .scored_topk import CHUNK_BUDGET_BYTES


def hisa_candidates(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, block_size: int,
                    num_blocks: int, causal: bool, key_start: Optional[torch.Tensor],
                    key_end: Optional[torch.Tensor], chunk: int = 0,
                    k_scale: Optional[torch.Tensor] = None,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int64 [B, S, min(min(m, ceil(T/block)) * block, T)] key ids of each query's kept blocks
    (every key, in order, when the m blocks are all of them: torch_impl.every_key_kept). k_scale
    [B, T] dequantizes FP8 keys before pooling (the pooled keys are real values); a per-query
    scale is the caller's to fold into w. `mask`: bool or additive, broadcastable to [B, S, T]."""
    batch, queries = q.shape[:2]
    T = k.shape[1]
    device = q.device
    if every_key_kept(T, block_size, num_blocks):
        return all_key_ids(batch, queries, T, device)
    # Block means are only a filter: 16-bit operands (the query's dtype; bf16 beside an FP8
    # query, which the dot upcasts exactly) keep it on the matrix units.
    kbar_dtype = torch.bfloat16 if q.dtype == torch.float8_e4m3fn else q.dtype
    kbar = pooled_keys(k, block_size, k_scale).to(kbar_dtype)
    total_blocks = kbar.shape[1]
    kept = min(num_blocks, total_blocks)
    out = torch.empty(batch, queries, kept * block_size, dtype=torch.int64, device=device)
    offsets = torch.arange(block_size, device=device)
    blocks_seen = (None if mask is None else
                   block_visibility(mask, batch, queries, T, block_size, causal, key_start,
                                    key_end))
    per_row = total_blocks * 4 + kept * block_size * 8
    step = chunk if chunk > 0 else max(1, CHUNK_BUDGET_BYTES // (batch * per_row))
    for row0 in range(0, queries, step):
        rows = min(step, queries - row0)
        beta = torch.empty(batch, rows, total_blocks, dtype=torch.float32, device=device)
        index_scores(q, kbar, w, rows=rows, row0=row0, causal=causal, key_start=key_start,
                     key_end=key_end, scale=1.0, n_cols=total_blocks, key_block=block_size,
                     force_ends=blocks_seen is None, out=beta, total_positions=T,
                     mask=blocks_seen)
        if blocks_seen is not None:
            beta = force_first_and_last_blocks(beta, blocks_seen[:, row0:row0 + rows])
        block_v = torch.empty(batch, rows, kept, dtype=torch.float32, device=device)
        block_i = torch.empty(batch, rows, kept, dtype=torch.int64, device=device)
        if next_pow2(max(total_blocks, kept)) <= MAX_ROW:
            candidate_topk(beta, kept, total_blocks, block_v, block_i)
        else:
            topk_rows(beta, kept, block_v, block_i)
        key_ids = (block_i[..., None] * block_size + offsets).flatten(-2)
        out[:, row0:row0 + rows] = torch.where(key_ids < T, key_ids, -1)
    return out


def hisa_candidates_op(q, k, w, block_size, num_blocks, causal, key_start, key_end, mask,
                       chunk=0, q_scale=None, k_scale=None):
    """The op (inputs validated by the caller); the ids of rows with a bad scale are -1."""
    ids = hisa_candidates(q, k, fold_query_scale(w, q_scale), block_size, num_blocks, causal,
                          key_start, key_end, chunk, k_scale=k_scale, mask=mask)
    return poison_ids(ids, scale_faults(q_scale, k_scale))
