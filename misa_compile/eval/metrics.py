"""How close a selection stays to the dense indexer's (ALGORITHM.md §5).

Selections are compared as sets of visible keys: an entry counts only if its score is finite (the
ops return -inf past the visible keys, with meaningless indices there). Recall is |S' ∩ S| / |S|
per query, IoU is |S' ∩ S| / |S' ∪ S|. A query that sees no more keys than k_top selects every
visible key under any variant, so it says nothing about a variant: means are taken over the
"informative" queries, those that see more than k_top keys."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from misa_compile.kernels.reference import selection_recall
from misa_compile.kernels.visibility import chunk_visibility


def selection_iou(selected: Tensor, selected_values: Tensor, dense: Tensor,
                  dense_values: Tensor) -> Tensor:
    """Per-query |S' ∩ S| / |S' ∪ S| over finite-score entries; float64 [B, S] (1.0 where both
    are empty)."""
    keys = int(max(selected.max(), dense.max())) + 1
    chosen = _member_set(selected, selected_values, keys)
    truth = _member_set(dense, dense_values, keys)
    inter = (chosen & truth).sum(-1).double()
    union = (chosen | truth).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def visible_key_counts(q: Tensor, k: Tensor, causal: bool = True,
                       key_start: Optional[Tensor] = None, key_end: Optional[Tensor] = None,
                       mask: Optional[Tensor] = None) -> Tensor:
    """Keys each query may see under the ops' visibility rules; int64 [B, S]."""
    batch, queries = q.shape[:2]
    visible, _ = chunk_visibility(slice(None), batch, queries, k.shape[1], q.device, causal,
                                  key_start, key_end, mask)
    return visible.sum(-1)


@dataclass(frozen=True)
class SelectionQuality:
    """Recall and IoU of one variant against dense on one layer (or site)."""

    recall: float        # mean over informative queries (NaN if there are none)
    iou: float           # mean over informative queries (NaN if there are none)
    recall_min: float    # worst informative query
    queries: int         # informative queries counted

    def as_dict(self) -> dict:
        return dict(recall=self.recall, iou=self.iou, recall_min=self.recall_min,
                    queries=self.queries)


def selection_quality(selected: tuple[Tensor, Tensor], dense: tuple[Tensor, Tensor],
                      visible_counts: Tensor, k_top: int) -> SelectionQuality:
    """Compares (values, indices) `selected` with `dense` over the queries that see more than
    k_top keys (visible_counts [B, S] from visible_key_counts)."""
    values, indices = selected
    dense_values, dense_indices = dense
    recall = selection_recall(indices, values, dense_indices, dense_values)
    iou = selection_iou(indices, values, dense_indices, dense_values)
    informative = visible_counts.to(recall.device) > k_top
    count = int(informative.sum())
    if count == 0:
        nan = float("nan")
        return SelectionQuality(recall=nan, iou=nan, recall_min=nan, queries=0)
    return SelectionQuality(recall=float(recall[informative].mean()),
                            iou=float(iou[informative].mean()),
                            recall_min=float(recall[informative].min()), queries=count)


def _member_set(indices: Tensor, values: Tensor, keys: int) -> Tensor:
    # Non-finite entries go to an extra dummy column so they never mark a real key.
    member = torch.zeros(indices.shape[:-1] + (keys + 1,), dtype=torch.bool,
                         device=indices.device)
    slots = torch.where(torch.isfinite(values), indices.long(), keys)
    return member.scatter_(-1, slots, True)[..., :keys]
