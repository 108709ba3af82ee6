"""The radix select (selection/radix_select.py) compiled for the card, at the shapes it is timed
at (bench/bench_indexer.py --topk-only) and on rows that force every path through it: the
sampled threshold, the in-register top-k of candidate lists and of whole rows, the flagged rows
streamed from memory (topk_rows) and rescored (scored_topk). Exactness against torch.topk by
sorted values; indices are checked for range, uniqueness and the values they gather, never
for order (ties are unspecified)."""
import pytest
import torch

import misa_compile  # noqa: F401
from misa_compile.kernels import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

if torch.cuda.is_available():
    from misa_compile.kernels.triton.launch.scored_topk import scored_topk
    from misa_compile.kernels.triton.selection import candidate_topk as ct
    from misa_compile.kernels.triton.selection.candidate_topk import candidate_topk
    from misa_compile.kernels.triton.selection.row_topk import topk_rows
    from misa_compile.kernels.triton.selection.sample_threshold import sample_threshold

K_TOP = 2048
# candidate_topk.MAX_ROW, the widest row held in registers.
MAX_ROW = 16384
NEG_INF = float("-inf")


def assert_topk(x, k, values, indices):
    """values / indices [..., k] hold a top-k of x [..., n] (NaN ranks as -inf)."""
    hidden = x.masked_fill(x.isnan(), NEG_INF)
    expect = hidden.topk(k, dim=-1).values.sort(-1).values
    assert torch.equal(values.sort(-1).values, expect)
    assert ((indices >= 0) & (indices < x.shape[-1])).all()
    assert torch.equal(hidden.gather(-1, indices), values)
    ordered = indices.sort(-1).values
    assert (ordered[..., 1:] != ordered[..., :-1]).all()


@pytest.mark.parametrize("rows,width", [(8192, 65536), (64, 131072), (1024, 65536)])
def test_topk_rows_is_exact_at_the_benchmark_shapes(rows, width):
    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(1, rows, width, generator=gen, device="cuda")
    values = torch.empty(1, rows, K_TOP, device="cuda")
    indices = torch.empty(1, rows, K_TOP, dtype=torch.int64, device="cuda")
    topk_rows(x, K_TOP, values, indices)
    assert_topk(x, K_TOP, values, indices)


def hard_rows(width, gen):
    """Rows that defeat the sampled threshold (ties, equal rows) or the key order's corners."""
    x = torch.randn(12, width, generator=gen, device="cuda")
    x[0] = (x[0] * 2).round()                    # few distinct values: heavy ties
    x[1] = 0.5                                   # all equal
    x[2, : width - 1000] = NEG_INF               # fewer finite entries than k
    x[3, torch.rand(width, generator=gen, device="cuda") < 0.5] = float("nan")
    x[4] = NEG_INF                               # nothing visible
    x[5] = 1.0 + torch.rand(width, generator=gen, device="cuda") * 1e-6  # shared high digits
    x[6] = torch.where(x[6] > 0, 0.0, -0.0)      # +0 and -0: equal values, distinct keys
    x[7] = x[7] * torch.logspace(-30, 30, width, device="cuda")
    x[8, :K_TOP] = 7.0                           # exactly k entries tie at the top
    x[9, : 3 * K_TOP] = 7.0                      # more ties at the top than k
    x[10] = -x[10].abs()                         # all negative
    return x


@pytest.mark.parametrize("width", [65536, 131072, 10000])
def test_topk_rows_on_hard_rows(width):
    gen = torch.Generator(device="cuda").manual_seed(width)
    x = hard_rows(width, gen)[None]
    values = torch.empty(1, 12, K_TOP, device="cuda")
    indices = torch.empty(1, 12, K_TOP, dtype=torch.int64, device="cuda")
    topk_rows(x, K_TOP, values, indices)
    assert_topk(x, K_TOP, values, indices)


@pytest.mark.parametrize("n,k_top", [(MAX_ROW, K_TOP), (MAX_ROW, MAX_ROW), (4096, 1), (3000, 2048)])
def test_candidate_topk_on_hard_rows(n, k_top):
    gen = torch.Generator(device="cuda").manual_seed(n + k_top)
    x = hard_rows(n, gen)[None]
    values = torch.empty(1, 12, k_top, device="cuda")
    indices = torch.empty(1, 12, k_top, dtype=torch.int64, device="cuda")
    candidate_topk(x, k_top, n, values, indices)
    assert_topk(x, k_top, values, indices)


def candidate_lists(rows, capacity, k_top, gen):
    """Candidate lists as index_scores EMIT leaves them: hard rows (tiled to `rows`), distinct
    key ids (one permutation for every row), and valid counts from under k to past the
    capacity (those lists are flagged)."""
    x = hard_rows(capacity, gen).repeat(-(-rows // 12), 1)[:rows][None].contiguous()
    perm = torch.randperm(1 << 20, generator=gen, device="cuda")[:capacity]
    ids = perm.int().repeat(rows, 1)[None].contiguous()
    count = torch.randint(k_top // 2, capacity + 64, (rows,), generator=gen, device="cuda",
                          dtype=torch.int32)
    return x, ids, count, perm


def assert_list_topk(x, perm, count, k_top, values, indices, flags):
    """Each row's selection is a top-k of its first min(count, capacity) entries (padded with
    -inf where fewer); every finite slot holds the id of a distinct valid entry of that value;
    rows with a count past the capacity or under k are flagged (lo is finite)."""
    capacity = x.shape[-1]
    valid = torch.arange(capacity, device="cuda")[None] < count[:, None]
    hidden = x[0].masked_fill(x[0].isnan() | ~valid, NEG_INF)
    assert torch.equal(values[0].sort(-1).values,
                       hidden.topk(k_top, dim=-1).values.sort(-1).values)
    position = torch.full((1 << 20,), -1, dtype=torch.int64, device="cuda")
    position[perm] = torch.arange(capacity, device="cuda")
    finite = values[0] > NEG_INF
    slot = position[indices[0].clamp(0, (1 << 20) - 1)]
    assert ((slot >= 0) | ~finite).all()
    slot = slot.clamp(min=0)
    assert (valid.gather(1, slot) | ~finite).all()
    assert torch.equal(hidden.gather(1, slot)[finite], values[0][finite])
    ordered = torch.where(finite, slot, -1 - torch.arange(k_top, device="cuda")).sort(-1).values
    assert (ordered[:, 1:] != ordered[:, :-1]).all()
    assert torch.equal(flags.bool(), (count > capacity) | (count < k_top))


@pytest.mark.parametrize("capacity,k_top", [(4096, K_TOP), (8192, K_TOP), (MAX_ROW, 8192)])
def test_candidate_topk_every_tuned_config_on_many_lists(capacity, k_top):
    """The many-rows path (tuned) and each of its configs launched alone, on 1024 lists."""
    gen = torch.Generator(device="cuda").manual_seed(capacity + k_top)
    rows = 1024
    x, ids, count, perm = candidate_lists(rows, capacity, k_top, gen)
    lo = torch.zeros(rows, device="cuda")
    configs = (ct._tuned if capacity <= ct.STREAM_ABOVE else ct._tuned_wide).configs
    launches = [dict()] + [dict(chunk=c.kwargs["CHUNK"], num_warps=c.num_warps)
                           for c in configs]
    for launch in launches:
        values = torch.full((1, rows, k_top), 5.0, device="cuda")
        indices = torch.full((1, rows, k_top), -7, dtype=torch.int64, device="cuda")
        flags = torch.full((rows,), 3, dtype=torch.int8, device="cuda")
        candidate_topk(x, k_top, 1 << 20, values, indices, ids=ids, count=count, lo=lo,
                       flags=flags, **launch)
        assert_list_topk(x, perm, count, k_top, values, indices, flags)


@pytest.mark.parametrize("n_sample,rank", [(8192, 175), (4096, 4096), (5000, 1)])
def test_sample_threshold_is_the_rank_th_value(n_sample, rank):
    gen = torch.Generator(device="cuda").manual_seed(n_sample)
    x = hard_rows(n_sample, gen)[None]
    lo = torch.empty(12, device="cuda")
    sample_threshold(x, rank, n_sample, lo)
    hidden = x[0].masked_fill(x[0].isnan(), NEG_INF)
    assert torch.equal(lo, hidden.topk(rank, dim=-1).values[:, -1])


def test_rows_that_all_tie_are_rescored_exactly():
    # Zero queries tie every score at 0: each row's candidate list overflows and the row is
    # rescored into scratch and selected from memory (flagged_rescore_kernel).
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.zeros(1, 16, 8, 64, device="cuda", dtype=torch.bfloat16)
    q[0, 8:] = torch.randn(8, 8, 64, generator=gen, device="cuda").bfloat16()
    k = torch.randn(1, 20000, 64, generator=gen, device="cuda").bfloat16()
    w = torch.randn(1, 16, 8, generator=gen, device="cuda").bfloat16()
    values, indices = scored_topk(q, k, w, K_TOP, 0.125, False, None, None)
    scores = reference.dense_scores(q, k, w, 0.125, False, None, None).float()[0]
    assert (values[0, :8] == 0).all()
    assert ((indices >= 0) & (indices < 20000)).all()
    ordered = indices.sort(-1).values
    assert (ordered[..., 1:] != ordered[..., :-1]).all()
    expect = scores[8:].topk(K_TOP, dim=-1).values
    assert torch.allclose(values[0, 8:].sort(-1).values, expect.sort(-1).values, rtol=1e-3,
                          atol=1e-3)
