"""Planted needles: the generator makes the needle out-score every other visible key for the
queries that look for it (its head dominates its score), so the dense indexer must always
retrieve it, at any depth and length; and the needle grid reports exactly that."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from misa_compile.config import MisaConfig
from misa_compile.eval.needle import needle_grid, needle_specs, retrieved_fraction
from misa_compile.eval.settings import QUICK
from misa_compile.eval.workloads import NeedleSpec, Structure, structured_workload
from misa_compile.kernels import indexer_topk, reference

HEADS, DIM = 16, 32


@pytest.mark.parametrize("keys", [256, 1024, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.35, 0.5, 0.8, 1.0])
def test_dominant_needle_is_always_retrieved_by_dense(keys, depth):
    wl = structured_workload(queries=4, keys=keys, heads=HEADS, dim=DIM,
                             seed=keys + int(depth * 100), needle=NeedleSpec(depth=depth, queries=2))
    needle = wl.needles[0]
    assert needle.margin >= Structure().needle_margin
    assert needle.position == round(depth * (keys - 4 + 2))
    # The needle head's own term is the largest part of the needle's dense score.
    rows = list(needle.query_rows)
    q, w, key = wl.q[0, rows], wl.w[0, rows], wl.k[0, needle.position]
    terms = w * (q @ key).relu()
    assert bool((terms[:, needle.head] > terms.sum(-1) / 2).all())
    k_top = 16
    selection = indexer_topk(wl.q, wl.k, wl.w, k_top, MisaConfig(variant="dense"))
    assert retrieved_fraction(selection, needle) == 1.0
    # And it is the top key by the float64 reference score.
    scores = reference.dense_scores(wl.q, wl.k, wl.w)
    assert bool((scores[0, rows].argmax(-1) == needle.position).all())


def test_needle_is_planted_in_every_sequence_of_the_batch():
    wl = structured_workload(batch=3, queries=4, keys=512, heads=HEADS, dim=DIM, seed=2,
                             needle=NeedleSpec(depth=0.7))
    assert [n.batch for n in wl.needles] == [0, 1, 2]
    selection = indexer_topk(wl.q, wl.k, wl.w, 16, MisaConfig(variant="dense"))
    assert all(retrieved_fraction(selection, n) == 1.0 for n in wl.needles)


def test_needle_head_and_queries_are_respected():
    wl = structured_workload(queries=6, keys=512, heads=HEADS, dim=DIM, seed=1,
                             needle=NeedleSpec(depth=0.4, head=3, queries=3))
    needle = wl.needles[0]
    assert needle.head == 3 and needle.query_rows == (3, 4, 5)


@pytest.mark.parametrize("spec, fragment", [
    (NeedleSpec(depth=1.5), "NeedleSpec.depth=1.5: must be in"),
    (NeedleSpec(depth=0.5, head=16), r"NeedleSpec.head=16: must be in \[0, H\)"),
    (NeedleSpec(depth=0.5, queries=5), r"NeedleSpec.queries=5: must be in \[1, S\]"),
])
def test_bad_needles_name_the_field(spec, fragment):
    with pytest.raises(ValueError, match=fragment):
        structured_workload(queries=4, keys=64, heads=HEADS, dim=DIM, needle=spec)


def test_retrieved_fraction_ignores_padding_entries():
    wl = structured_workload(queries=2, keys=64, heads=4, dim=16, seed=0,
                             needle=NeedleSpec(depth=0.0, queries=2))
    needle = wl.needles[0]
    indices = torch.full((1, 2, 3), needle.position)
    values = torch.tensor([[[float("-inf")] * 3, [1.0, float("-inf"), float("-inf")]]])
    assert retrieved_fraction((values, indices), needle) == 0.5


def test_needle_grid_dense_row_is_all_retrieved():
    settings = dataclasses.replace(QUICK, index_heads=HEADS, head_dim=DIM, k_top=16,
                                   block_size=32, candidates=64, hisa_block=8, hisa_blocks=4,
                                   needle_lengths=(256, 512), needle_depths=(0.0, 0.5, 1.0))
    specs = needle_specs(settings)
    assert [s.key for s in specs] == ["dense", "misa_h8", "misa_hier_h8", "hisa"]
    grid = needle_grid(settings, specs, torch.device("cpu"))
    assert grid["lengths"] == [256, 512] and grid["depths"] == [0.0, 0.5, 1.0]
    assert grid["grids"]["dense"] == [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    for rows in grid["grids"].values():
        assert all(0.0 <= v <= 1.0 for row in rows for v in row)


@pytest.mark.parametrize("heads, dim", [(64, 128), (64, 32), (8, 16)])
def test_needle_can_be_planted_for_every_seed_and_depth(heads, dim):
    """The needle's direction is redrawn until no other head (a negative one included) can
    cancel the needle head's term, so planting never fails."""
    for seed in range(24):
        wl = structured_workload(queries=4, keys=256, heads=heads, dim=dim, seed=seed,
                                 needle=NeedleSpec(depth=(seed % 11) / 10, queries=2))
        assert wl.needles[0].margin >= Structure().needle_margin
