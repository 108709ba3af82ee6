"""The radix select (selection/radix_select.py) under Triton's CPU interpreter: the k-th largest
key (over key bits, and over a row's values with the exact finish) against a direct definition, and every selection built on it (candidate_topk,
sample_threshold, the streamed flagged_topk, topk_rows) against torch.topk on rows with heavy
ties, -inf, NaN (ranks as -inf), equal rows, k == n and fewer visible entries than k. Selections
are compared by their sorted values and by the validity and uniqueness of their indices, never
by index order (ties are unspecified)."""
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU interpreter tests (the GPU has tests/gpu)")

if os.environ.get("TRITON_INTERPRET") == "1":
    import triton
    import triton.language as tl

    from misa_compile.kernels.triton.selection.candidate_topk import candidate_topk
    from misa_compile.kernels.triton.selection.flagged_topk import flagged_topk
    from misa_compile.kernels.triton.common import ordered_key
    from misa_compile.kernels.triton.selection.radix_select import kth_largest, kth_largest_key
    from misa_compile.kernels.triton.selection.row_topk import plan_selection, topk_rows
    from misa_compile.kernels.triton.selection.sample_threshold import sample_threshold

    @triton.jit
    def kth_kernel(key_ptr, k_ptr, out_ptr, n, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        slots = tl.arange(0, BLOCK)
        keys = tl.load(key_ptr + r * n + slots, mask=slots < n, other=0).to(tl.uint32,
                                                                             bitcast=True)
        threshold, above = kth_largest_key(keys, tl.load(k_ptr + r), BLOCK)
        tl.store(out_ptr + 2 * r, threshold.to(tl.int32, bitcast=True))
        tl.store(out_ptr + 2 * r + 1, above)

    @triton.jit
    def kth_of_values_kernel(val_ptr, k_ptr, out_ptr, n, BLOCK: tl.constexpr):
        # As candidate_topk holds a row: NaN as -inf, padding lanes value -inf and key 0.
        r = tl.program_id(0)
        slots = tl.arange(0, BLOCK)
        values = tl.load(val_ptr + r * n + slots, mask=slots < n, other=float("-inf"))
        values = tl.where(values == values, values, float("-inf"))
        keys = tl.where(slots < n, ordered_key(values), 0)
        threshold, above = kth_largest(values, keys, tl.load(k_ptr + r), BLOCK)
        tl.store(out_ptr + 2 * r, threshold.to(tl.int32, bitcast=True))
        tl.store(out_ptr + 2 * r + 1, above)

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None)
NEG_INF = float("-inf")
ROW_KINDS = ("normal", "ties", "neg_inf", "nan", "equal", "all_neg_inf", "wide", "narrow",
             "zeros")


def ordered_keys(x: torch.Tensor) -> np.ndarray:
    bits = x.contiguous().numpy().view(np.uint32).astype(np.int64)
    return np.where(bits >> 31 != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)


def kth_reference(keys: np.ndarray, k: int, lanes: int) -> tuple[int, int]:
    """Largest t with count(keys >= t) >= k over `lanes` lanes (padding lanes are key 0)."""
    full = np.concatenate([keys, np.zeros(lanes - keys.size, dtype=np.int64)])
    t = int(np.sort(full)[::-1][k - 1]) if k <= lanes else 0
    return t, int((full > t).sum())


def make_row(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, generator=gen)
    if kind == "ties":
        x = (x * 2).round()
    elif kind == "neg_inf":
        x[torch.rand(n, generator=gen) < 0.6] = NEG_INF
    elif kind == "nan":
        x[torch.rand(n, generator=gen) < 0.3] = float("nan")
        x[torch.rand(n, generator=gen) < 0.2] = NEG_INF
    elif kind == "equal":
        x = torch.full((n,), 0.75)
    elif kind == "all_neg_inf":
        x = torch.full((n,), NEG_INF)
    elif kind == "wide":
        x = x * torch.logspace(-30, 30, n)[torch.randperm(n, generator=gen)]
    elif kind == "narrow":
        x = 1.0 + torch.rand(n, generator=gen) * 1e-5
    elif kind == "zeros":
        # +0.0 and -0.0 tie as values but not as ordered keys.
        x = torch.where(torch.rand(n, generator=gen) < 0.5, 0.0, -0.0) * (x.abs() < 1)
    return x


def assert_topk(x: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor):
    """values / indices [..., >= k] hold a top-k of x [..., n] (k <= n; NaN ranks as -inf)."""
    hidden = x.masked_fill(x.isnan(), NEG_INF)
    values, indices = values[..., :k], indices[..., :k]
    expect = hidden.topk(k, dim=-1).values
    assert torch.equal(values.sort(-1).values, expect.sort(-1).values)
    assert ((indices >= 0) & (indices < x.shape[-1])).all()
    assert torch.equal(hidden.gather(-1, indices), values)
    flat = indices.reshape(-1, k)
    assert all(row.unique().numel() == k for row in flat)


@SETTINGS
@given(n=st.integers(1, 70), k=st.integers(1, 70), kind=st.sampled_from(("uniform", "ties",
                                                                          "extremes")),
       seed=st.integers(0, 2 ** 16))
def test_kth_largest_key_matches_its_definition(n, k, kind, seed):
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        keys = rng.integers(0, 2 ** 32, size=(3, n), dtype=np.int64)
    elif kind == "ties":
        keys = rng.choice(np.array([1, 0x7F800000, 0x80000000, 0x80000001, 0xC0000000]),
                          size=(3, n))
    else:
        # Digits 0 and 255 at every pass: lanes above the prefix share bin 255 with them.
        keys = rng.choice(np.array([0, 1, 0xFF, 0x100, 0x80FFFFFF, 0x8100FF00, 0xFFFFFF00,
                                    0xFFFFFFFE, 0xFFFFFFFF]), size=(3, n))
    block = triton.next_power_of_2(max(n, 16))
    ks = torch.tensor([k, max(1, k // 3), block + 1], dtype=torch.int32)
    src = torch.from_numpy(keys.astype(np.uint32).view(np.int32).copy())
    out = torch.empty(3, 2, dtype=torch.int32)
    kth_kernel[(3,)](src, ks, out, n, BLOCK=block)
    for r in range(3):
        t, above = kth_reference(keys[r], int(ks[r]), block)
        assert int(out[r, 0]) & 0xFFFFFFFF == t and int(out[r, 1]) == above


VALUE_KINDS = ROW_KINDS + ("pos_inf", "clustered", "huge_span", "denormal_span")


def make_value_row(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """make_row's rows plus the corners of the value binning: +inf lanes, a cluster of nearly
    equal values under one outlier (the code passes leave many keys in the final code: the
    fallback), a span past fp32 (max - min overflows) and a denormal span (32768 / span
    overflows)."""
    if kind == "pos_inf":
        x = torch.randn(n, generator=gen)
        x[torch.rand(n, generator=gen) < 0.3] = float("inf")
        x[torch.rand(n, generator=gen) < 0.2] = NEG_INF
        return x
    if kind == "clustered":
        x = 1.0 + torch.randint(0, 40, (n,), generator=gen) * 2.0 ** -20
        x[0] = 1e6
        return x
    if kind == "denormal_span":
        return torch.randint(-2, 3, (n,), generator=gen) * torch.finfo(torch.float32).smallest_normal * 2.0 ** -22
    if kind == "huge_span":
        x = torch.randn(n, generator=gen)
        x[0], x[-1] = 3e38, -3e38
        return x
    return make_row(kind, n, gen)


@SETTINGS
@given(n=st.integers(1, 300), k=st.integers(1, 300), kind=st.sampled_from(VALUE_KINDS),
       seed=st.integers(0, 2 ** 16))
def test_kth_largest_of_values_matches_its_definition(n, k, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.stack([make_value_row(kind, n, gen), make_value_row("normal", n, gen),
                     make_value_row(kind, n, gen)])
    block = triton.next_power_of_2(max(n, 16))
    assert_kth_of_values(x, [k, max(1, k // 3), block + 1])


@pytest.mark.parametrize("kind", VALUE_KINDS)
def test_kth_largest_of_values_on_every_row_kind(kind):
    gen = torch.Generator().manual_seed(11)
    x = torch.stack([make_value_row(kind, 200, gen) for _ in range(4)])
    assert_kth_of_values(x, [1, 37, 199, 200])


def assert_kth_of_values(x: torch.Tensor, ks: list[int]):
    """kth_largest over each row of x [R, n] (its own k) equals the definition."""
    rows, n = x.shape
    block = triton.next_power_of_2(max(n, 16))
    out = torch.empty(rows, 2, dtype=torch.int32)
    kth_of_values_kernel[(rows,)](x.contiguous(), torch.tensor(ks, dtype=torch.int32), out, n,
                                  BLOCK=block)
    keys = ordered_keys(x.masked_fill(x.isnan(), NEG_INF))
    for r in range(rows):
        t, above = kth_reference(keys[r], ks[r], block)
        assert int(out[r, 0]) & 0xFFFFFFFF == t and int(out[r, 1]) == above


# chunk 0: the row held in registers; 16: streamed from memory in pieces of 16 lanes (as rows
# wider than STREAM_ABOVE are).
@pytest.mark.parametrize("chunk", [0, 16])
@pytest.mark.parametrize("kind", ROW_KINDS)
@pytest.mark.parametrize("n,k", [(40, 12), (40, 40), (37, 1), (64, 63)])
def test_candidate_topk_on_hard_rows(kind, n, k, chunk):
    gen = torch.Generator().manual_seed(n * 31 + k)
    x = torch.stack([make_row(kind, n, gen) for _ in range(3)])[None]
    values = torch.empty(1, 3, k)
    indices = torch.empty(1, 3, k, dtype=torch.int64)
    candidate_topk(x, k, n, values, indices, chunk=chunk)
    assert_topk(x, k, values, indices)


@pytest.mark.parametrize("chunk", [0, 16])
@pytest.mark.parametrize("kind", ROW_KINDS)
def test_candidate_topk_with_more_slots_than_entries_pads_with_neg_inf(kind, chunk):
    gen = torch.Generator().manual_seed(7)
    n, k = 9, 20
    x = torch.stack([make_row(kind, n, gen) for _ in range(2)])[None]
    values = torch.empty(1, 2, k)
    indices = torch.empty(1, 2, k, dtype=torch.int64)
    # The padding slots' ids start at tail_base (the end of the visible entries): distinct.
    candidate_topk(x, k, 40, values, indices, tail_base=torch.full((2,), n), chunk=chunk)
    hidden = x.masked_fill(x.isnan(), NEG_INF)
    expect = torch.cat([hidden, torch.full((1, 2, k - n), NEG_INF)], -1).sort(-1).values
    assert torch.equal(values.sort(-1).values, expect)
    assert ((indices >= 0) & (indices < 40)).all()
    assert all(row.unique().numel() == k for row in indices.view(-1, k))


@SETTINGS
@given(width=st.integers(1, 150), k=st.integers(1, 100), kind=st.sampled_from(VALUE_KINDS),
       chunk=st.sampled_from([16, 32, 64]), seed=st.integers(0, 2 ** 16))
def test_streamed_candidate_lists_match_the_rows_in_registers(width, k, kind, chunk, seed):
    """Candidate lists (key ids, valid counts, thresholds, tails, flags) selected streamed in
    pieces and held in registers: the same slots, bit for bit (both place ties in lane order)."""
    gen = torch.Generator().manual_seed(seed)
    rows = 4
    x = torch.stack([make_value_row(kind, width, gen) for _ in range(rows)])[None]
    ids = torch.randperm(10 * width, generator=gen)[:width].repeat(rows, 1)[None].int()
    count = torch.randint(0, width + 3, (rows,), generator=gen, dtype=torch.int32)
    lo = torch.where(torch.rand(rows, generator=gen) < 0.5, -1.0, NEG_INF)
    tail = torch.randint(0, 10 * width, (rows,), generator=gen)
    results = []
    for c in (0, chunk):
        values = torch.full((1, rows, k), 123.0)
        indices = torch.full((1, rows, k), -5, dtype=torch.int64)
        flags = torch.full((rows,), 7, dtype=torch.int8)
        candidate_topk(x, k, 10 * width, values, indices, ids=ids, count=count, lo=lo,
                       tail_base=tail, flags=flags, chunk=c)
        results.append((values, indices, flags))
    (v0, i0, f0), (v1, i1, f1) = results
    assert torch.equal(v0.nan_to_num(), v1.nan_to_num()) and torch.equal(i0, i1)
    assert torch.equal(f0, f1)


@pytest.mark.parametrize("kind", ROW_KINDS)
def test_flagged_rows_are_selected_exactly_from_memory(kind):
    gen = torch.Generator().manual_seed(3)
    n, k = 53, 17
    x = torch.stack([make_row(kind, n, gen) for _ in range(3)])[None]
    values = torch.full((1, 3, k), 123.0)
    indices = torch.full((1, 3, k), -5, dtype=torch.int64)
    flags = torch.tensor([1, 0, 1], dtype=torch.int8)
    flagged_topk(x, flags, k, values, indices)
    assert_topk(x[:, ::2], k, values[:, ::2], indices[:, ::2])
    assert (values[0, 1] == 123.0).all() and (indices[0, 1] == -5).all()


@pytest.mark.parametrize("kind", ROW_KINDS)
def test_sample_threshold_is_the_rank_th_largest(kind):
    gen = torch.Generator().manual_seed(5)
    x = torch.stack([make_row(kind, 60, gen) for _ in range(2)])[None]
    lo = torch.empty(2)
    sample_threshold(x, 9, 60, lo)
    hidden = x[0].masked_fill(x[0].isnan(), NEG_INF)
    assert torch.equal(lo, hidden.topk(9, dim=-1).values[:, -1])


@SETTINGS
@given(n=st.integers(1, 400), k=st.integers(1, 40), kind=st.sampled_from(ROW_KINDS),
       seed=st.integers(0, 2 ** 16))
def test_topk_rows_matches_torch_topk(n, k, kind, seed):
    k = min(k, n)
    gen = torch.Generator().manual_seed(seed)
    x = torch.stack([make_row(kind, n, gen), make_row("normal", n, gen)])[None]
    values = torch.empty(1, 2, k)
    indices = torch.empty(1, 2, k, dtype=torch.int64)
    topk_rows(x, k, values, indices)
    assert_topk(x, k, values, indices)


def test_topk_rows_sampled_path_on_hard_rows():
    # Wide enough rows to take the sample -> compact -> select path; tied and equal rows
    # overflow their lists and are redone by flagged_topk.
    n, k = 900, 24
    assert not plan_selection(k, n).direct
    gen = torch.Generator().manual_seed(13)
    x = torch.stack([make_row(kind, n, gen) for kind in ROW_KINDS])[None]
    values = torch.empty(1, len(ROW_KINDS), k)
    indices = torch.empty(1, len(ROW_KINDS), k, dtype=torch.int64)
    topk_rows(x, k, values, indices)
    assert_topk(x, k, values, indices)
