"""Decode scoring with the router and the q_scale fold inside (kernels/triton/scoring/
decode_scores.py), run by Triton's CPU interpreter: the scores are bit for bit those of the
separate launches it replaced (MISA: route_heads over the same pooled keys, routed_inputs,
query_scores; dense: the q_scale fold, query_scores) for head counts that are and are not powers
of two, ties between heads, queries whose router scores are all NaN, FP8 inputs with scales and
empty sequences; paged decode, dense and MISA, poisons exactly the sequences whose q_scale row
has a bad entry; and MISA decode issues the Triton launches dense decode does."""
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not INTERPRET, reason="CPU interpreter tests")

if INTERPRET:
    from misa_compile.kernels.triton.launch.device_checks import fold_query_scale
    from misa_compile.kernels.triton.launch.paged_decode_topk import (checked_paging,
                                                                      paged_decode_topk_op)
    from misa_compile.kernels.triton.launch.route_heads import route_heads
    from misa_compile.kernels.triton.scoring.query_scores import query_scores
    from misa_compile.kernels.triton.scoring.routed_inputs import routed_inputs
    from misa_compile.kernels.triton.scoring.decode_scores import decode_scores
    from misa_compile.kernels.triton.scoring.router_scores import pooled_keys

FP8 = torch.float8_e4m3fn
BLOCK = 16
BAD_SCALES = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, -1.0]


def decode_site(seq_lens, num_heads, dim=16, page=8, pages=8, seed=0, fp8=False):
    """q [B, H, D], w [B, H], k_cache [P, page, D], block_table [B, pages] (shuffled distinct
    pages, -1 past each sequence's), seq_lens int64, q_scale [B, H] and k_scale [P, page] (FP8
    only, else None)."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(seq_lens)
    seq_lens = torch.tensor(seq_lens)
    num_pages = batch * pages + 2
    q = torch.randn(batch, num_heads, dim, generator=gen)
    w = torch.randn(batch, num_heads, generator=gen)
    k_cache = torch.randn(num_pages, page, dim, generator=gen)
    owners = torch.randperm(num_pages, generator=gen)[:batch * pages].view(batch, pages)
    used = torch.arange(pages) * page < seq_lens[:, None]
    table = torch.where(used, owners, -1).int()
    q_scale = k_scale = None
    if fp8:
        q_scale = torch.rand(batch, num_heads, generator=gen) + 0.25
        k_scale = torch.rand(num_pages, page, generator=gen) + 0.25
        q, k_cache = (q * 8).to(FP8), (k_cache * 8).to(FP8)
    return q, w, k_cache, table, seq_lens, q_scale, k_scale


def fused(q, w, k_cache, table, seq_lens, q_scale, k_scale, active_heads):
    table, lengths, _ = checked_paging(k_cache, table, seq_lens)
    pooled = pooled_keys(k_cache, BLOCK, k_scale, table, lengths) if active_heads else None
    out = torch.empty(q.shape[0], table.shape[1] * k_cache.shape[1])
    faults = decode_scores(q, k_cache, w, lengths, out, scale=0.5, active_heads=active_heads,
                           pooled=pooled, block_size=BLOCK, q_scale=q_scale, k_scale=k_scale,
                           block_table=table)
    return out, faults


def separate_launches(q, w, k_cache, table, seq_lens, q_scale, k_scale, active_heads):
    """The launches the fused kernel replaced: route_heads and routed_inputs (MISA) or the
    q_scale fold (dense), then query_scores."""
    table, lengths, _ = checked_paging(k_cache, table, seq_lens)
    batch = q.shape[0]
    q, w = q[:, None], w[:, None]
    q_scale = None if q_scale is None else q_scale[:, None]
    key_end = lengths.view(batch, 1)
    vis = dict(causal=False, key_start=torch.zeros_like(key_end), key_end=key_end)
    faults = None
    if active_heads:
        heads = route_heads(q, k_cache, fold_query_scale(w, q_scale), active_heads, BLOCK,
                            **vis, k_scale=k_scale, block_table=table, seq_lens=lengths)
        q, w, faults = routed_inputs(q, w, heads, q_scale)
        faults = faults[:, 0]
    else:
        w = fold_query_scale(w, q_scale)
    out = torch.empty(batch, 1, table.shape[1] * k_cache.shape[1])
    query_scores(q, k_cache, w, out, rows=1, row0=0, scale=0.5, k_scale=k_scale,
                 block_table=table, **vis)
    return out[:, 0], faults


def assert_same_bits(got, want):
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("num_heads,active_heads",
                         [(8, 2), (6, 3), (16, 8), (40, 8), (64, 8), (8, 0), (40, 0), (128, 0)])
def test_scores_equal_the_separate_launches_bit_for_bit(num_heads, active_heads):
    site = decode_site([64, 37, 1, 0], num_heads, seed=num_heads)
    got, faults = fused(*site, active_heads)
    want, _ = separate_launches(*site, active_heads)
    assert faults is None
    if num_heads & (num_heads - 1) == 0:
        assert_same_bits(got, want)
    else:
        # route_heads selects these heads with candidate_topk, whose output order is not the
        # router's pick order: the same heads, summed in another order.
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # Past each sequence's length every score is -inf, an empty sequence included.
    past = torch.arange(got.shape[1]) >= site[4][:, None]
    assert (got[past] == float("-inf")).all() and got[~past].isfinite().all()


@pytest.mark.parametrize("active_heads", [0, 3])
def test_fp8_with_scales_equals_the_separate_launches(active_heads):
    site = decode_site([64, 50, 9], 8, seed=3, fp8=True)
    got, faults = fused(*site, active_heads)
    want, want_faults = separate_launches(*site, active_heads)
    assert_same_bits(got, want)
    assert not faults.any()
    assert want_faults is None or torch.equal(faults, want_faults)


def test_tied_heads_route_to_the_lower_index():
    """Heads 1, 4 and 6 are copies of one head: equal router scores. The routed heads, hence the
    scores, are those route_heads picks (the lower indices first)."""
    q, w, k_cache, table, seq_lens, _, _ = decode_site([48, 30], 8, seed=11)
    for copy in (4, 6):
        q[:, copy], w[:, copy] = q[:, 1], w[:, 1]
    w[:, 1] = w[:, 1].abs() * 100  # the copies are the strongest heads
    w[:, 4], w[:, 6] = w[:, 1], w[:, 1]
    site = (q, w, k_cache, table, seq_lens, None, None)
    for active_heads in (1, 2):
        got, _ = fused(*site, active_heads)
        want, _ = separate_launches(*site, active_heads)
        assert_same_bits(got, want)


def test_a_query_with_nan_router_scores_still_routes_distinct_heads():
    """A NaN in one sequence's q makes all its router scores NaN (-inf): it still gets h
    distinct heads, the lowest indices, as route_heads gives, and its padding heads (H = 6 is
    padded to 16 rows) are never among them."""
    q, w, k_cache, table, seq_lens, _, _ = decode_site([40, 40], 6, seed=5)
    q[0, :, 0] = float("nan")
    site = (q, w, k_cache, table, seq_lens, None, None)
    got, _ = fused(*site, 3)
    want, _ = separate_launches(*site, 3)
    assert_same_bits(got, want)
    assert got[0, :40].isnan().logical_not().all()  # NaN scores are stored as -inf


@pytest.mark.parametrize("active_heads", [0, 2])
@pytest.mark.parametrize("bad", BAD_SCALES)
def test_a_bad_query_scale_poisons_its_sequence_only(bad, active_heads):
    q, w, k_cache, table, seq_lens, q_scale, k_scale = decode_site([64, 40, 20], 8, seed=2,
                                                                   fp8=True)
    q_scale[1, 5] = bad
    site = (q, w, k_cache, table, seq_lens, q_scale, k_scale)
    _, faults = fused(*site, active_heads)
    assert faults.tolist() == [False, True, False]
    values, indices = paged_decode_topk_op(q, k_cache, w, table, seq_lens, 6, active_heads,
                                           BLOCK, 0.5, q_scale, k_scale)
    assert values[1].isnan().all() and (indices[1] == -1).all()
    ok = [0, 2]
    assert values[ok].isfinite().all() and (indices[ok] >= 0).all()
    # The other sequences select what they select with a good scale in that row.
    q_scale[1, 5] = 1.0
    want_values, want_indices = paged_decode_topk_op(q, k_cache, w, table, seq_lens, 6,
                                                     active_heads, BLOCK, 0.5, q_scale, k_scale)
    assert torch.equal(values[ok].sort(-1).values, want_values[ok].sort(-1).values)
    assert torch.equal(indices[ok].sort(-1).values, want_indices[ok].sort(-1).values)


def test_misa_decode_launches_the_kernels_dense_decode_does(monkeypatch):
    """With cached pooled keys, a MISA paged decode call issues the same Triton launches as a
    dense one (checked_paging, decode_scores, the top-k), FP8 with both scales too: routing,
    the routed gather and the q_scale fold add none."""
    import sys
    from torch.library import wrap_triton

    launches = []

    def recording(kernel):
        launcher = wrap_triton(kernel)
        fn = kernel
        while hasattr(fn, "fn"):
            fn = fn.fn

        class Recorded:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launches.append(fn.__name__)
                    return launcher[grid](*args, **kwargs)
                return launch
        return Recorded()

    for name, module in list(sys.modules.items()):
        if name.startswith("misa_compile.kernels.triton.") and hasattr(module, "wrap_triton"):
            monkeypatch.setattr(module, "wrap_triton", recording)
    for fp8 in (False, True):
        q, w, k_cache, table, seq_lens, q_scale, k_scale = decode_site([64, 64], 16, seed=6,
                                                                       fp8=fp8)
        table, lengths, _ = checked_paging(k_cache, table, seq_lens)
        pooled = pooled_keys(k_cache, BLOCK, k_scale, table, lengths)
        kernels = {}
        for active_heads in (0, 4):
            launches.clear()
            paged_decode_topk_op(q, k_cache, w, table, seq_lens, 8, active_heads, BLOCK, 0.5,
                                 q_scale, k_scale, pooled if active_heads else None)
            kernels[active_heads] = list(launches)
        assert kernels[0] == kernels[4]
        assert "decode_scores_kernel" in kernels[4]
        assert not {"router_scores_kernel", "routed_inputs_kernel"} & set(kernels[4])
