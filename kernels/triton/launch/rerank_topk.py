"""Exact all-head re-rank of candidate keys (MISA-hierarchical's second stage, HISA's
refinement): each query's candidate keys are gathered inside query_scores' loads and scored with
all H heads, then candidate_topk selects among them. Memory O(chunk x candidates)."""
from __future__ import annotations

from typing import Optional

import torch

from ..selection.candidate_topk import MAX_ROW, candidate_topk
from ..common import next_pow2
from ..scoring.query_scores import query_scores
from .device_checks import fold_query_scale, poison_selection, scale_faults
from ..selection.row_topk import topk_rows
from .scored_topk import CHUNK_BUDGET_BYTES, visible_end


def rerank_topk(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, candidates: torch.Tensor,
                k_top: int, scale: float, causal: bool, key_start: Optional[torch.Tensor],
                key_end: Optional[torch.Tensor], chunk: int = 0,
                k_scale: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values fp32, indices int64) [B, S, min(k_top, T)] among candidates [B, S, C]; ids
    outside [0, T) and hidden keys score -inf; C < k_top pads with -inf. k_scale [B, T]
    dequantizes FP8 keys (see query_scores); `mask` (bool or additive, broadcastable to
    [B, S, T]) is read at each candidate's (query, key) entry."""
    batch, queries = q.shape[:2]
    T = k.shape[1]
    width = candidates.shape[-1]
    K = min(k_top, T)
    device = q.device
    values = torch.empty(batch, queries, K, dtype=torch.float32, device=device)
    indices = torch.empty(batch, queries, K, dtype=torch.int64, device=device)
    in_registers = next_pow2(max(width, K)) <= MAX_ROW
    step = chunk if chunk > 0 else max(1, CHUNK_BUDGET_BYTES // (batch * width * 4))
    for row0 in range(0, queries, step):
        rows = min(step, queries - row0)
        scores = torch.empty(batch, rows, width, dtype=torch.float32, device=device)
        cand = candidates[:, row0:row0 + rows]
        query_scores(q, k, w, scores, rows=rows, row0=row0, causal=causal, key_start=key_start,
                     key_end=key_end, scale=scale, candidates=cand, k_scale=k_scale,
                     mask=mask)
        tail_base = visible_end(batch, queries, T, row0, rows, causal, key_end, device)
        out_v, out_i = values[:, row0:row0 + rows], indices[:, row0:row0 + rows]
        if in_registers:
            candidate_topk(scores, K, T, out_v, out_i, ids=cand, tail_base=tail_base)
            continue
        taken = min(K, width)
        slot_v = torch.empty(batch, rows, taken, dtype=torch.float32, device=device)
        slot_i = torch.empty(batch, rows, taken, dtype=torch.int64, device=device)
        topk_rows(scores, taken, slot_v, slot_i)
        out_v.fill_(float("-inf"))
        out_i.zero_()
        out_v[..., :taken] = slot_v
        out_i[..., :taken] = cand.gather(-1, slot_i).long().clamp(0, T - 1)
    return values, indices


def rerank_topk_op(q, k, w, candidates, k_top, scale, causal, key_start, key_end, mask, chunk=0,
                   q_scale=None, k_scale=None):
    """The op (inputs validated by the caller); rows with a bad scale are poisoned."""
    values, indices = rerank_topk(q, k, fold_query_scale(w, q_scale), candidates, k_top, scale,
                                  causal, key_start, key_end, chunk, k_scale=k_scale, mask=mask)
    return poison_selection(values, indices, scale_faults(q_scale, k_scale))
