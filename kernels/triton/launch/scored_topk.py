"""Scoring + top-k for the dense and routed indexer, without the [S, T] fp32 score matrix.

Per chunk of queries (extra memory O(chunk x (T/16 + capacity)), never O(chunk x T)):
  1. index_scores scores each query against every 16th key (1/16 of the work) and
     sample_threshold turns that sample into a per-row threshold lo;
  2. index_scores scores all visible keys and appends only the scores >= lo to short per-row
     candidate lists (about 1.4 k entries instead of T);
  3. candidate_topk selects exactly within each list and flags the rare row whose threshold
     missed; flagged rows are rescored and selected exactly on the device
     (selection/flagged_topk.py), so nothing waits on the host.
The routed op hands in its heads already gathered into contiguous [B, S, h, D] / [B, S, h]
tensors (scoring/routed_inputs.py), so routed scoring is the dense kernel over h heads with
plain strided loads (measured 27% faster on an H100 than gathering through the head table
inside the kernel's loads). Chunks whose keys fit a candidate list (short contexts) are scored
in full and selected directly. Few queries per sequence (decode) take the per-query kernel
(query_scores) and select with topk_rows.
Causal chunks only launch key tiles up to their last visible key. The op's mask (bool or
additive, any shape broadcastable to [B, S, T]) goes to every scoring kernel, read through its
strides; masked selections then get hidden ids in their -inf slots (hidden_tails.py).

Writing the chunk's full fp32 scores and selecting from them (topk_rows) measured about as fast
for the dense kernel and 8% slower for 8 routed heads at 8192 x 64K, with O(chunk x T) memory."""

from __future__ import annotations

from typing import Optional

import torch

from ..selection.candidate_topk import MAX_ROW, candidate_topk
from ..selection.flagged_topk import rescore_flagged_rows
from ..selection.hidden_tails import hidden_tails
from ..scoring.index_scores import index_scores
from ..scoring.query_scores import query_scores
from ..selection.row_topk import plan_selection, topk_rows
from ..selection.sample_threshold import sample_threshold

# Below this many queries per sequence the queries-as-rows tile would be mostly padding.
FEW_QUERIES = 16
# Scratch per chunk (sample scores + candidate lists, or full scores on the direct path).
CHUNK_BUDGET_BYTES = 1 << 30


def visible_end(batch: int, queries: int, T: int, row0: int, rows: int, causal: bool,
                key_end: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """int64 [B * rows]: the end of each query's visible key range, clamped to [0, T] (the base
    of the hidden tail ids, see candidate_topk), in as few launches as the layout allows (decode
    calls are short enough for each small launch to show)."""
    first = T - queries + row0 + 1
    if key_end is not None:
        hi = key_end[:, row0:row0 + rows].long().clamp(0, T)
        if causal:
            hi = torch.minimum(hi, torch.arange(first, first + rows, device=device))
        return hi.reshape(-1)
    if causal:
        return torch.arange(first, first + rows, device=device).repeat(batch)
    return torch.full((batch * rows,), T, dtype=torch.int64, device=device)


def _chunk_rows(batch: int, queries: int, bytes_per_row: int, chunk: int) -> int:
    if chunk > 0:
        return min(chunk, queries)
    rows = CHUNK_BUDGET_BYTES // max(1, batch * bytes_per_row)
    return max(128, min(queries, rows // 128 * 128))


def scored_topk(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, k_top: int, scale: float,
                causal: bool, key_start: Optional[torch.Tensor], key_end: Optional[torch.Tensor],
                chunk: int = 0, k_scale: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-min(k_top, T) keys per query of the index score over every head of q [B, S, H, D] and
    w [B, S, H] (all heads for the dense op, the gathered routed heads for the routed one).
    Returns (values fp32, indices int64) [B, S, K], unordered; see ops.py for the conventions.
    k_scale [B, T] fp32 dequantizes FP8 keys (each key's score is multiplied by it); a
    per-query scale is folded into w by the caller. `mask`: the op's bool or additive mask, any
    shape broadcastable to [B, S, T]."""
    batch, queries, _, _ = q.shape
    T = k.shape[1]
    K = min(k_top, T)
    device = q.device
    values = torch.empty(batch, queries, K, dtype=torch.float32, device=device)
    indices = torch.empty(batch, queries, K, dtype=torch.int64, device=device)
    vis = dict(causal=causal, key_start=key_start, key_end=key_end, scale=scale, k_scale=k_scale,
               mask=mask)

    if queries < FEW_QUERIES:
        scores = torch.empty(batch, queries, T, dtype=torch.float32, device=device)
        query_scores(q, k, w, scores, rows=queries, row0=0, **vis)
        tail_base = visible_end(batch, queries, T, 0, queries, causal, key_end, device)
        topk_rows(scores, K, values, indices, tail_base=tail_base)
        _hide_tails(values, indices, T, **vis)
        return values, indices

    widest = plan_selection(K, T)
    if widest is None:
        per_row = T * 4
    elif widest.direct:
        per_row = widest.capacity * 4
    else:
        per_row = widest.n_sample * 4 + widest.capacity * 8 + 16
    step = _chunk_rows(batch, queries, per_row, chunk)
    for row0 in range(0, queries, step):
        rows = min(step, queries - row0)
        # Keys past the chunk's last visible key (causal) are hidden from all of its queries.
        n_keys = min(T, max(1, T - queries + row0 + rows)) if causal else T
        plan = plan_selection(K, n_keys)
        tail_base = visible_end(batch, queries, T, row0, rows, causal, key_end, device)
        out_v = values[:, row0:row0 + rows]
        out_i = indices[:, row0:row0 + rows]
        flat = batch * rows
        if plan is None:
            scores = torch.empty(batch, rows, T, dtype=torch.float32, device=device)
            index_scores(q, k, w, rows=rows, row0=row0, n_cols=T, out=scores, **vis)
            v, i = scores.topk(K, dim=-1, sorted=False)
            out_v.copy_(v)
            out_i.copy_(i)
            continue
        if plan.direct:
            scores = torch.empty(batch, rows, n_keys, dtype=torch.float32, device=device)
            index_scores(q, k, w, rows=rows, row0=row0, n_cols=n_keys, out=scores, **vis)
            candidate_topk(scores, K, T, out_v, out_i, tail_base=tail_base)
            continue
        sample = torch.empty(batch, rows, plan.n_sample, dtype=torch.float32, device=device)
        index_scores(q, k, w, rows=rows, row0=row0, n_cols=plan.n_sample,
                     key_stride=plan.key_stride, out=sample, **vis)
        lo = torch.empty(flat, dtype=torch.float32, device=device)
        sample_threshold(sample, plan.rank, plan.n_sample, lo)
        del sample
        cand_val = torch.empty(flat, plan.capacity, dtype=torch.float32, device=device)
        cand_idx = torch.empty(flat, plan.capacity, dtype=torch.int32, device=device)
        count = torch.zeros(flat, dtype=torch.int32, device=device)
        index_scores(q, k, w, rows=rows, row0=row0, n_cols=n_keys,
                     emit=(lo, cand_val, cand_idx, count), **vis)
        flags = torch.empty(flat, dtype=torch.int8, device=device)
        candidate_topk(cand_val.view(batch, rows, -1), K, T, out_v, out_i,
                       ids=cand_idx.view(batch, rows, -1), count=count, lo=lo,
                       tail_base=tail_base, flags=flags)
        rescore_flagged_rows(q, k, w, flags, K, out_v, out_i, rows=rows, row0=row0, **vis)
    _hide_tails(values, indices, T, **vis)
    return values, indices


def _hide_tails(values, indices, T, *, causal, key_start, key_end, mask, **_):
    """Masked selections only: hidden ids in the -inf slots (hidden_tails.py). Rows too wide for
    registers were selected by torch.topk, whose ids are distinct already."""
    if mask is not None and values.shape[-1] <= MAX_ROW:
        hidden_tails(values, indices, mask, T, causal, key_start, key_end)
