"""Top-k along the last axis of a score matrix in memory, the fast replacement for
torch.topk(scores, k) on wide rows (decode rows, benchmarks):

  1. sample_threshold: a 1-in-16 sample of each row gives a threshold lo that leaves between k
     and ~1.4 k scores above it (with a margin of about 4 standard deviations);
  2. compact_rows: one streaming pass over each row keeps the scores >= lo (value + key id);
  3. candidate_topk: exact top-k of each short candidate list in registers.
Rows that miss the bounds (flagged by step 3; rare, e.g. huge ties) are redone exactly by
flagged_topk, on the device: no host sync, so calls queue back to back.
Rows short enough to sit in registers skip steps 1-2. The full matrix is read twice at most
(the sample reads 1/16 of it); nothing of size [rows, T] is written."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .candidate_topk import MAX_ROW, candidate_topk
from ..common import next_pow2
from .compact_rows import compact_rows
from .flagged_topk import flagged_topk
from .sample_threshold import MAX_SAMPLE, sample_rank, sample_threshold

MIN_KEY_STRIDE = 16
# Candidate lists are sized for ~1.45x the expected count: overflow needs a 5-sigma sample.
CAPACITY_FACTOR = 1.45


@dataclass(frozen=True)
class SelectionPlan:
    """How k of n_keys scores per row are selected. direct: the rows themselves fit in
    registers. Otherwise a 1-in-key_stride sample of n_sample scores gives the rank-`rank`
    threshold, and candidate lists hold `capacity` entries."""
    direct: bool
    key_stride: int
    n_sample: int
    rank: int
    capacity: int


def plan_selection(k_top: int, n_keys: int) -> Optional[SelectionPlan]:
    """None when k_top is too large for in-register selection (callers fall back to torch)."""
    key_stride = max(MIN_KEY_STRIDE, math.ceil(n_keys / MAX_SAMPLE))
    rank = sample_rank(k_top, key_stride)
    capacity = next_pow2(math.ceil(CAPACITY_FACTOR * rank * key_stride))
    if n_keys <= capacity:
        width = next_pow2(max(n_keys, k_top))
        if width > MAX_ROW:
            return None
        return SelectionPlan(True, 1, n_keys, k_top, width)
    if capacity > MAX_ROW:
        return None
    return SelectionPlan(False, key_stride, math.ceil(n_keys / key_stride), rank, capacity)


def topk_rows(scores: torch.Tensor, k_top: int, out_values: torch.Tensor,
              out_indices: torch.Tensor, tail_base: Optional[torch.Tensor] = None) -> None:
    """Top-k_top (k_top <= n) of scores [B, R, n] (fp32, unit column stride) into out_values fp32 /
    out_indices int64 [B, R, k_top]. NaN ranks with -inf. tail_base [B*R]: see candidate_topk."""
    batch, rows, n_keys = scores.shape
    plan = plan_selection(k_top, n_keys)
    if plan is None:
        values, indices = _hide_nan(scores).topk(k_top, dim=-1, sorted=False)
        out_values.copy_(values)
        out_indices.copy_(indices)
        return
    if plan.direct:
        candidate_topk(scores, k_top, n_keys, out_values, out_indices, tail_base=tail_base)
        return
    flat = batch * rows
    lo = torch.empty(flat, dtype=torch.float32, device=scores.device)
    sample_threshold(scores, plan.rank, plan.n_sample, lo, column_stride=plan.key_stride)
    cand_val = torch.empty(flat, plan.capacity, dtype=torch.float32, device=scores.device)
    cand_idx = torch.empty(flat, plan.capacity, dtype=torch.int32, device=scores.device)
    count = torch.empty(flat, dtype=torch.int32, device=scores.device)
    compact_rows(scores, lo, cand_val, cand_idx, count)
    flags = torch.empty(flat, dtype=torch.int8, device=scores.device)
    candidate_topk(cand_val.view(batch, rows, -1), k_top, n_keys, out_values, out_indices,
                   ids=cand_idx.view(batch, rows, -1), count=count, lo=lo,
                   tail_base=tail_base, flags=flags)
    flagged_topk(scores, flags, k_top, out_values, out_indices)


def _hide_nan(scores: torch.Tensor) -> torch.Tensor:
    # NaN ranks with the hidden keys (torch.nan_to_num would also turn -inf into a finite value).
    return scores.masked_fill(scores.isnan(), float("-inf"))
