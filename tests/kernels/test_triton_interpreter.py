"""Every Triton kernel of the misa ops run by Triton's CPU interpreter (TRITON_INTERPRET=1, set
by the root conftest) on tiny fp32/fp16 inputs, against the float64 references. Selections are
compared by the reference scores of the chosen keys, never by index order (ties are
unspecified). Grids are kept to a few dozen programs: the interpreter costs milliseconds each."""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from misa_compile.kernels import reference, torch_impl

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU interpreter tests (the GPU has tests/gpu)")

if os.environ.get("TRITON_INTERPRET") == "1":
    import triton

    from misa_compile.kernels.triton.selection.candidate_topk import candidate_topk
    from misa_compile.kernels.triton.selection.compact_rows import compact_rows
    import triton.language as tl

    from misa_compile.kernels.triton.common import append_candidates
    from misa_compile.kernels.triton.launch.hisa_candidates import hisa_candidates
    from misa_compile.kernels.triton.launch.rerank_topk import rerank_topk
    from misa_compile.kernels.triton.scoring.router_scores import (pooled_keys, router_scores,
                                                                   selects_heads)
    from misa_compile.kernels.triton.launch import route_heads as route_heads_module
    from misa_compile.kernels.triton.launch.route_heads import route_heads
    from misa_compile.kernels.triton.selection.row_topk import plan_selection, topk_rows
    from misa_compile.kernels.triton.launch.scored_topk import scored_topk
    from misa_compile.kernels.triton.scoring.routed_inputs import routed_inputs

FEW = settings(max_examples=4, deadline=None, derandomize=True)
NEG_INF = float("-inf")


def make(batch, queries, keys, heads, dim=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, queries, heads, dim, generator=gen).to(dtype)
    k = torch.randn(batch, keys, dim, generator=gen).to(dtype)
    w = torch.randn(batch, queries, heads, generator=gen).to(dtype)
    return q, k, w


def scored_inputs(q, w, heads):
    """q, w as scored_topk takes them: every head, or each query's routed heads gathered."""
    if heads is None:
        return q, w
    q_routed, w_routed, _ = routed_inputs(q, w, heads)
    return q_routed, w_routed


def ragged(batch, queries, keys, seed):
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, keys // 2, (batch, queries), generator=gen)
    return start, start + torch.randint(0, keys, (batch, queries), generator=gen)


def assert_same_selection(values, indices, ref_values, scores):
    """The chosen keys' reference scores equal the reference top values (sorted), the
    returned values are those scores, -inf marks exactly the missing tail, indices in range."""
    finite = torch.isfinite(values)
    assert torch.equal(finite.sum(-1), torch.isfinite(ref_values).sum(-1))
    assert ((indices >= 0) & (indices < scores.shape[-1])).all()
    gathered = torch.where(finite, scores.gather(-1, indices), NEG_INF)
    expect = ref_values.sort(-1).values
    torch.testing.assert_close(gathered.sort(-1).values, expect, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(torch.where(finite, values.double(), NEG_INF).sort(-1).values,
                               expect, rtol=2e-3, atol=2e-3)


@FEW
@given(causal=st.booleans(), use_ragged=st.booleans(), routed=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]), keys=st.integers(17, 90),
       k_top=st.sampled_from([5, 40, 200]))
def test_scored_topk_matches_the_reference(causal, use_ragged, routed, dtype, keys, k_top):
    q, k, w = make(2, 20, keys, 4, dtype=dtype, seed=keys)
    ks, ke = ragged(2, 20, keys, keys) if use_ragged else (None, None)
    heads = torch.stack([torch.randperm(4)[:2] for _ in range(40)]).view(2, 20, 2) if routed else None
    q_in, w_in = scored_inputs(q, w, heads)
    values, indices = scored_topk(q_in, k, w_in, k_top, 0.5, causal, ks, ke)
    if routed:
        scores = reference.routed_scores(q, k, w, heads, 0.5, causal, ks, ke)
    else:
        scores = reference.dense_scores(q, k, w, 0.5, causal, ks, ke)
    ref_values = scores.topk(min(k_top, keys), dim=-1).values
    assert_same_selection(values, indices, ref_values, scores)


@pytest.mark.parametrize("routed", [False, True])
def test_sampled_threshold_path_matches_the_reference(routed):
    # 300 keys exceed the candidate capacity for k=10: sample, threshold, emit, select.
    keys, k_top = 300, 10
    assert not plan_selection(k_top, keys).direct
    q, k, w = make(1, 16, keys, 4, seed=1)
    heads = torch.stack([torch.randperm(4)[:2] for _ in range(16)])[None] if routed else None
    q_in, w_in = scored_inputs(q, w, heads)
    values, indices = scored_topk(q_in, k, w_in, k_top, 1.0, True, None, None)
    scores = (reference.routed_scores(q, k, w, heads) if routed
              else reference.dense_scores(q, k, w))
    assert_same_selection(values, indices, scores.topk(k_top, dim=-1).values, scores)


def test_few_queries_take_the_heads_as_rows_kernel_with_hidden_tail_indices():
    q, k, w = make(3, 1, 80, 4, seed=2)
    ends = torch.tensor([[80], [3], [50]])
    starts = torch.tensor([[0], [1], [20]])
    values, indices = scored_topk(q, k, w, 8, 1.0, False, starts, ends)
    scores = reference.dense_scores(q, k, w, 1.0, False, starts, ends)
    assert_same_selection(values, indices, scores.topk(8, dim=-1).values, scores)
    tail = indices[1, 0][~torch.isfinite(values[1, 0])]
    assert ((tail < 1) | (tail >= 3)).all() and tail.unique().numel() == tail.numel()


def test_nan_scores_never_win():
    q, k, w = make(1, 16, 60, 4, seed=3)
    k[0, 7] = float("nan")
    q[0, 3, 1] = float("nan")
    values, indices = scored_topk(q, k, w, 10, 1.0, True, None, None)
    assert not torch.isnan(values).any()
    assert not ((indices == 7) & torch.isfinite(values)).any()
    assert not torch.isfinite(values[0, 3]).any()


@pytest.mark.parametrize("row", ["equal", "fewer_than_k", "signs", "wide", "narrow"])
def test_candidate_topk_on_rows_that_share_high_bits_or_not(row):
    # Rows whose keys share all, some or none of their high radix digits.
    gen = torch.Generator().manual_seed(5)
    x = {"equal": torch.full((1, 2, 40), 1.5),
         "fewer_than_k": torch.cat([torch.randn(1, 2, 6, generator=gen),
                                    torch.full((1, 2, 34), NEG_INF)], -1),
         "signs": torch.randn(1, 2, 40, generator=gen),
         "wide": torch.randn(1, 2, 40, generator=gen) * torch.logspace(-30, 30, 40),
         "narrow": 1.0 + torch.rand(1, 2, 40, generator=gen) * 1e-3}[row]
    values = torch.empty(1, 2, 12)
    indices = torch.empty(1, 2, 12, dtype=torch.int64)
    candidate_topk(x, 12, 40, values, indices)
    expect = x.topk(12, dim=-1).values
    assert torch.equal(values.sort(-1).values, expect.sort(-1).values)
    finite = torch.isfinite(values)
    assert torch.equal(x.gather(-1, indices)[finite], values[finite])
    assert all(row.unique().numel() == 12 for row in indices.view(-1, 12))


def test_candidate_topk_on_rows_shorter_than_k():
    x = torch.tensor([[[1.25, 1.5, 1.75, 1.375, 1.625, 1.125]]])
    values = torch.empty(1, 1, 12)
    indices = torch.empty(1, 1, 12, dtype=torch.int64)
    candidate_topk(x, 12, 40, values, indices)
    assert torch.equal(values[torch.isfinite(values)].sort().values, x.flatten().sort().values)
    assert (values == NEG_INF).sum() == 6


@FEW
@given(n=st.integers(1, 300), k_top=st.integers(1, 64), ties=st.booleans())
def test_candidate_topk_matches_torch_topk(n, k_top, ties):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(1, 3, n, generator=gen)
    if ties:
        x = x.round()
    x[0, 1, : n // 2] = NEG_INF
    values = torch.empty(1, 3, k_top)
    indices = torch.empty(1, 3, k_top, dtype=torch.int64)
    candidate_topk(x, k_top, n, values, indices)
    K = min(k_top, n)
    expect = x.topk(K, dim=-1).values
    assert torch.equal(values[..., :K].sort(-1).values, expect.sort(-1).values) or torch.equal(
        values.sort(-1).values[..., -K:], expect.sort(-1).values)
    assert (values.isinf() & (values < 0)).sum() >= (expect.isinf() & (expect < 0)).sum()
    assert ((indices >= 0) & (indices < n)).all()


def test_topk_rows_sampled_path_matches_torch_topk():
    x = torch.randn(1, 4, 900)
    x[0, 0, :890] = NEG_INF
    x[0, 1, 17] = float("nan")
    values = torch.empty(1, 4, 24)
    indices = torch.empty(1, 4, 24, dtype=torch.int64)
    topk_rows(x, 24, values, indices)
    expect = x.masked_fill(x.isnan(), NEG_INF).topk(24, dim=-1).values
    assert torch.equal(values.sort(-1).values, expect.sort(-1).values)
    finite = torch.isfinite(values)
    assert torch.equal(x.gather(-1, indices)[finite].sort().values, values[finite].sort().values)


if os.environ.get("TRITON_INTERPRET") == "1":
    @triton.jit
    def append_tile_kernel(src_ptr, lo_ptr, cand_val_ptr, cand_idx_ptr, count_ptr, n_rows,
                           n_cols, CAP: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, PER_ELEMENT: tl.constexpr):
        # One [BLOCK_M, BLOCK_N] tile of a score matrix through index_scores' EMIT epilogue.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < n_rows, cols < n_cols
        scores = tl.load(src_ptr + rows[:, None] * n_cols + cols[None, :],
                         mask=row_ok[:, None] & col_ok[None, :], other=float("-inf"))
        lo = tl.load(lo_ptr + rows, mask=row_ok, other=float("inf"))
        append_candidates(scores, row_ok[:, None] & col_ok[None, :], cols, rows, lo, count_ptr,
                          cand_val_ptr, cand_idx_ptr, CAP, PER_ELEMENT)


def test_rows_whose_threshold_misses_are_redone_exactly_on_the_device():
    # Equal or heavily tied rows put every score above the sampled threshold: the candidate
    # lists overflow, the rows are flagged and flagged_topk selects them from the matrix.
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1, 3, 900, generator=gen)
    # Row 1: 800 equal scores, then the 100 that matter (dropped by an overflowing list).
    x[0, 1, :800] = 0.5
    x[0, 1, 800:] = torch.arange(1.0, 101.0)
    x[0, 2] = (x[0, 2] * 2).round().clamp(-1, 1)
    x[0, 2, 7] = float("nan")
    plan = plan_selection(24, 900)
    assert not plan.direct and 900 > plan.capacity
    values = torch.empty(1, 3, 24)
    indices = torch.empty(1, 3, 24, dtype=torch.int64)
    topk_rows(x, 24, values, indices)
    expect = x.masked_fill(x.isnan(), NEG_INF).topk(24, dim=-1).values
    assert torch.equal(values.sort(-1).values, expect.sort(-1).values)
    assert torch.equal(x.gather(-1, indices), values)
    assert all(row.unique().numel() == 24 for row in indices.view(-1, 24))


@pytest.mark.parametrize("per_element", [False, True])
def test_both_slot_reservations_append_exactly_the_scores_above_threshold(per_element):
    x = torch.randn(20, 40)
    lo = torch.full((20,), 0.5)
    lo[3] = NEG_INF
    cap = 64
    cand_val, cand_idx = torch.empty(20, cap), torch.empty(20, cap, dtype=torch.int32)
    count = torch.zeros(20, dtype=torch.int32)
    append_tile_kernel[(2, 3)](x, lo, cand_val, cand_idx, count, 20, 40, CAP=cap, BLOCK_M=16,
                               BLOCK_N=16, PER_ELEMENT=per_element)
    expected = x >= lo[:, None]
    assert torch.equal(count.long(), expected.sum(-1))
    for row in range(20):
        n = int(count[row])
        ids = cand_idx[row, :n].long()
        assert torch.equal(ids.sort().values, expected[row].nonzero().flatten())
        assert torch.equal(cand_val[row, :n], x[row, ids])


@pytest.mark.parametrize("parts", [1, 3])
def test_row_compaction_keeps_the_finite_scores_above_threshold(parts):
    # parts=1: one program per row, column order; parts=3: pieces reserve slots by atomics.
    x = torch.randn(2, 3, 70)
    x[0, 1, 5] = float("nan")
    x[1, 0, :60] = NEG_INF
    lo = torch.tensor([0.5, 0.5, NEG_INF, NEG_INF, -0.2, 2.0])
    cap = 24
    cand_val, cand_idx = torch.empty(6, cap), torch.empty(6, cap, dtype=torch.int32)
    count = torch.full((6,), 99, dtype=torch.int32)
    compact_rows(x, lo, cand_val, cand_idx, count, parts=parts)
    flat = x.reshape(6, 70)
    expected = (flat >= lo[:, None]) & (flat > NEG_INF)
    assert torch.equal(count.long(), expected.sum(-1))
    assert (count > cap).any(), "the case must cover an overflowing row"
    for row in range(6):
        n = min(int(count[row]), cap)
        ids = cand_idx[row, :n].long()
        assert ids.unique().numel() == n and expected[row, ids].all()
        assert torch.equal(cand_val[row, :n], flat[row, ids])
        if parts == 1 or n < cap:
            assert torch.equal(ids.sort().values, expected[row].nonzero().flatten()[:n])


@FEW
@given(causal=st.booleans(), use_ragged=st.booleans(), block=st.sampled_from([8, 24]))
def test_router_picks_the_reference_top_heads(causal, use_ragged, block):
    q, k, w = make(2, 20, 70, 6, seed=block)
    ks, ke = ragged(2, 20, 70, block) if use_ragged else (None, None)
    torch.testing.assert_close(pooled_keys(k, block).double(), reference.pooled_keys(k, block).double())
    heads = route_heads(q, k, w, 3, block, causal, ks, ke)
    r = reference.router_scores(q, k, w, block, causal, ks, ke)
    torch.testing.assert_close(r.gather(-1, heads).sort(-1).values,
                               r.topk(3, dim=-1).values.sort(-1).values)
    assert (heads.sort(-1).values.diff(dim=-1) > 0).all()


def empty_and_ragged(batch, queries, keys, seed):
    """Ragged ranges where every third query's is empty: key_start == key_end = 13, inside
    the second block of 8 keys (a block that overlaps [13, 13) if only its ends are compared)."""
    key_start, key_end = ragged(batch, queries, keys, seed)
    key_end = key_end.clamp(min=key_start + 1)
    key_start[:, ::3] = 13
    key_end[:, ::3] = 13
    return key_start, key_end


@pytest.mark.parametrize("causal", [False, True])
def test_router_scores_of_an_empty_range_are_zero(causal):
    q, k, w = make(2, 9, 70, 6, seed=3)
    ks, ke = empty_and_ragged(2, 9, 70, 3)
    kbar = pooled_keys(k, 8)
    scores = router_scores(q, w, kbar, 8, 70, causal, ks, ke)
    ref = reference.router_scores(q, k, w, 8, causal, ks, ke)
    assert (ref[:, ::3] == 0).all()
    torch.testing.assert_close(scores.double(), ref, rtol=1e-5, atol=1e-5)


def lower_index_top_heads(r, active_heads):
    """The reference's top heads with ties broken towards the lower head index (what the kernels
    promise; torch.topk leaves ties unspecified), NaN ranking lowest, as sorted sets."""
    ranked = torch.nan_to_num(r, nan=NEG_INF).sort(dim=-1, descending=True, stable=True)
    return ranked.indices[..., :active_heads].sort(-1).values


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,active", [(32, 1), (32, 8), (32, 32), (64, 1), (64, 8), (64, 64)])
def test_fused_router_selection_picks_the_reference_head_sets(heads, active, causal, monkeypatch):
    queries, keys = 8, 70
    q, k, w = make(2, queries, keys, heads, seed=heads + active)
    ks, ke = empty_and_ragged(2, queries, keys, heads)
    # Exact ties, equal in fp32 and float64 alike: query 1's heads in runs of three equal ones
    # (a top-h boundary cuts a run), query 2's all equal, query 4's second half the first with
    # w negated (|w| enters the score).
    q[:, 1], w[:, 1] = q[:, 1, ::3].repeat_interleave(3, 1)[:, :heads], w[:, 1, :1]
    q[:, 2], w[:, 2] = q[:, 2, :1], w[:, 2, :1]
    q[:, 4, heads // 2:], w[:, 4, heads // 2:] = q[:, 4, :heads // 2], -w[:, 4, :heads // 2]
    # NaN heads rank last: some of query 5's q rows; every w of query 7 (all -inf: the lowest
    # heads). Both see keys. Queries 0, 3 and 6 see none (all scores 0: the lowest heads too).
    q[:, 5, 1::5, 3] = float("nan")
    w[:, 7] = float("nan")
    ks[:, 5], ke[:, 5] = 0, keys
    ks[:, 7], ke[:, 7] = 0, keys

    def no_second_launch(*args, **kwargs):
        raise AssertionError("the fused router launched candidate_topk")

    assert selects_heads(queries, heads)
    with monkeypatch.context() as patch:
        patch.setattr(route_heads_module, "selects_heads", lambda *args: False)
        unfused = route_heads(q, k, w, active, 8, causal, ks, ke).sort(-1).values
    monkeypatch.setattr(route_heads_module, "candidate_topk", no_second_launch)
    chosen = route_heads(q, k, w, active, 8, causal, ks, ke)
    assert chosen.dtype == torch.int64 and chosen.shape == (2, queries, active)
    chosen = chosen.sort(-1).values
    assert (chosen.diff(dim=-1) > 0).all() and ((chosen >= 0) & (chosen < heads)).all()
    expect = lower_index_top_heads(reference.router_scores(q, k, w, 8, causal, ks, ke), active)
    assert torch.equal(chosen, expect)
    # The scores and candidate_topk (the path of other H) break ties the same way.
    assert torch.equal(unfused, expect)
    assert torch.equal(chosen[:, 6], torch.arange(active).expand(2, active))
    assert torch.equal(chosen[:, 7], torch.arange(active).expand(2, active))


@FEW
@given(causal=st.booleans(), width=st.sampled_from([6, 50]))
def test_rerank_matches_scoring_only_the_candidates(causal, width):
    q, k, w = make(2, 18, 60, 4, seed=width)
    gen = torch.Generator().manual_seed(width)
    cand = torch.randint(-2, 62, (2, 18, width), generator=gen)
    values, indices = rerank_topk(q, k, w, cand, 10, 1.0, causal, None, None)
    ref_values, _ = torch_impl.rerank_topk(q.double(), k.double(), w.double(), cand, 10, 1.0,
                                           causal, None, None, None, 0)
    scores = reference.dense_scores(q, k, w, 1.0, causal)
    assert_same_selection(values, indices, ref_values.double(), scores)


@pytest.mark.parametrize("causal", [True, False])
def test_hisa_keeps_the_reference_visible_blocks(causal):
    q, k, w = make(1, 16, 100, 4, seed=4)
    ours = hisa_candidates(q, k, w, 16, 3, causal, None, None)
    ref = torch_impl.hisa_candidates(q.double(), k.double(), w.double(), 16, 3, causal, None,
                                     None, None, 0)
    assert ours.shape == ref.shape
    assert torch.equal(ours.sort(-1).values, ref.sort(-1).values)
