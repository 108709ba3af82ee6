"""Recall and IoU count only visible (finite-score) keys, compare sets (never index order), and
average over the queries that see more than k_top keys."""
from __future__ import annotations

import math

import torch

from misa_compile.eval.metrics import selection_iou, selection_quality, visible_key_counts

INF = float("inf")


def sel(indices, values=None):
    indices = torch.tensor(indices)
    values = torch.ones(indices.shape) if values is None else torch.tensor(values)
    return values, indices


def test_iou_of_sets_ignores_order_and_padding():
    dense = sel([[[0, 1, 2, 3]]])
    same_reordered = sel([[[3, 2, 1, 0]]])
    half = sel([[[0, 1, 7, 8]]])
    padded = sel([[[0, 1, 5, 6]]], [[[1.0, 1.0, -INF, -INF]]])
    assert selection_iou(same_reordered[1], same_reordered[0], dense[1], dense[0]).item() == 1.0
    assert selection_iou(half[1], half[0], dense[1], dense[0]).item() == 2 / 6
    # Padding entries (-inf) are not members: {0,1} vs {0,1,2,3}.
    assert selection_iou(padded[1], padded[0], dense[1], dense[0]).item() == 0.5


def test_quality_averages_only_queries_that_see_more_than_k_top_keys():
    dense = sel([[[0, 1], [0, 1], [2, 3]]])
    variant = sel([[[0, 1], [0, 5], [2, 9]]])
    counts = torch.tensor([[2, 6, 6]])  # the first query sees only k_top keys: uninformative
    quality = selection_quality(variant, dense, counts, k_top=2)
    assert quality.queries == 2
    assert quality.recall == 0.5 and quality.recall_min == 0.5
    assert abs(quality.iou - 1 / 3) < 1e-12


def test_quality_is_nan_without_informative_queries():
    dense = sel([[[0, 1]]])
    quality = selection_quality(dense, dense, torch.tensor([[2]]), k_top=2)
    assert quality.queries == 0 and math.isnan(quality.recall) and math.isnan(quality.iou)


def test_visible_counts_follow_the_ops_visibility_rules():
    q, k = torch.zeros(1, 3, 2, 4), torch.zeros(1, 10, 4)
    assert visible_key_counts(q, k).tolist() == [[8, 9, 10]]
    starts, ends = torch.tensor([[0, 2, 5]]), torch.tensor([[4, 4, 10]])
    assert visible_key_counts(q, k, causal=False, key_start=starts,
                              key_end=ends).tolist() == [[4, 2, 5]]
    mask = torch.zeros(1, 3, 10)
    mask[..., :3] = -INF
    assert visible_key_counts(q, k, mask=mask).tolist() == [[5, 6, 7]]
