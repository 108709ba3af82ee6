"""misa::paged_decode_topk on a CUDA device at serving shapes (batch 64, up to 64K keys in pages
of 64, H=64, D=128, bf16 and FP8) against the torch implementation on the same GPU (the pages
gathered, then the contiguous ops). Selections are compared by the exact fp32 scores of the keys
they chose, never by index order. MISA's routed heads come from the Triton router, whose choice
is checked against the float64 router of each sequence's own keys; the routed selection is then
compared with torch's routed_topk under those heads (near-tied heads would otherwise make two
correct routers disagree)."""
import pytest
import torch

import misa_compile  # noqa: F401  (registers the ops and their CUDA kernels)
from misa_compile.kernels import reference, torch_impl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

if torch.cuda.is_available():
    from misa_compile.kernels.triton.scoring.router_scores import pooled_keys
    from misa_compile.kernels.triton.launch.route_heads import route_heads

ops = torch.ops.misa
FP8 = torch.float8_e4m3fn
BATCH, HEADS, DIM, PAGE, MAX_KEYS, K_TOP = 64, 64, 128, 64, 65536, 2048
# Relative to the row's largest score: bf16 inputs with fp32 accumulation land near 1e-6, FP8
# dots (Hopper's FP8 accumulation is narrower than fp32) near 1e-4.
TOL = 2e-3


def paged_site(dtype, seed=0):
    """q [B,H,D], k_cache [P,64,D], w [B,H], shuffled int32 block table with -1 past each
    sequence's pages, seq_lens int32 (64K, 0, below k_top, inside a page, random), and the FP8
    scales (None for bf16)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    pages = MAX_KEYS // PAGE
    num_pages = BATCH * pages
    seq_lens = torch.randint(1, MAX_KEYS + 1, (BATCH,), generator=gen, device="cuda")
    seq_lens[:4] = torch.tensor([MAX_KEYS, 0, 100, 1000 * PAGE + 17])
    seq_lens = seq_lens.int()
    owners = torch.randperm(num_pages, generator=gen, device="cuda").view(BATCH, pages)
    used = torch.arange(pages, device="cuda") * PAGE < seq_lens[:, None]
    block_table = torch.where(used, owners, -1).int()
    q = torch.randn(BATCH, HEADS, DIM, generator=gen, device="cuda")
    k_cache = torch.randn(num_pages, PAGE, DIM, generator=gen, device="cuda")
    w = torch.randn(BATCH, HEADS, generator=gen, device="cuda") * HEADS ** -0.5
    if dtype == FP8:
        q, q_scale = quantize_rows(q)
        k_cache, k_scale = quantize_rows(k_cache)
    else:
        q, k_cache, q_scale, k_scale = q.to(dtype), k_cache.to(dtype), None, None
    return q, k_cache, w.bfloat16(), block_table, seq_lens, q_scale, k_scale


def quantize_rows(x):
    scale = (x.abs().amax(-1) / torch.finfo(FP8).max).clamp_min(1e-6)
    return (x / scale[..., None]).to(FP8), scale


def real(q, q_scale):
    return q.float() if q_scale is None else q.float() * q_scale[..., None]


def exact_scores(q, k, w, indices, heads=None, q_scale=None, k_scale=None, scale=1.0):
    """fp32 index scores [B, K] of the chosen positions of the gathered keys k [B, T, D]."""
    # gather has no FP8 kernels: one-byte keys move as raw bytes.
    source = k.view(torch.uint8) if k.element_size() == 1 else k
    chosen = source.gather(1, indices[..., None].expand(-1, -1, k.shape[-1])).view(k.dtype)
    chosen = chosen.float()
    if k_scale is not None:
        chosen = chosen * k_scale.gather(1, indices)[..., None]
    logits = torch.einsum("bhd,bkd->bhk", real(q, q_scale), chosen).relu_()
    weights = w.float()
    if heads is not None:
        weights = torch.zeros_like(weights).scatter_(1, heads, weights.gather(1, heads))
    return torch.einsum("bhk,bh->bk", logits, weights) * scale


def assert_same_selection(values, indices, ref_values, exact, seq_lens):
    K = ref_values.shape[-1]
    assert values.shape == indices.shape == (BATCH, K)
    assert not torch.isnan(values).any()
    finite = torch.isfinite(values)
    assert torch.equal(finite.sum(-1), torch.isfinite(ref_values).sum(-1))
    assert torch.equal(finite.sum(-1), seq_lens.long().clamp(max=K))
    assert ((indices >= 0) & (indices < MAX_KEYS)).all()
    assert (indices[finite] < seq_lens.long()[:, None].expand_as(indices)[finite]).all()
    keys = torch.where(finite, indices, -1 - torch.arange(K, device="cuda")).sort(-1).values
    assert not ((keys[:, 1:] == keys[:, :-1]) & (keys[:, 1:] >= 0)).any(), "a key chosen twice"
    magnitude = ref_values[torch.isfinite(ref_values)].abs().max()
    value_err = ((values - exact).abs() * finite).nan_to_num(0).max() / magnitude
    assert value_err < TOL, f"returned values differ from the chosen keys' scores: {value_err}"
    ours = torch.where(finite, exact, float("-inf")).sort(-1, descending=True).values
    ref = ref_values.sort(-1, descending=True).values
    both = torch.isfinite(ours) & torch.isfinite(ref)
    select_err = ((ours - ref).abs() * both).nan_to_num(0).max() / magnitude
    assert select_err < TOL, f"the chosen keys' scores differ from torch's top-k: {select_err}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8])
def test_dense_matches_the_torch_implementation(dtype):
    q, k_cache, w, table, seq_lens, q_scale, k_scale = paged_site(dtype)
    values, indices = ops.paged_decode_topk(q, k_cache, w, table, seq_lens, K_TOP, scale=0.5,
                                            q_scale=q_scale, k_scale=k_scale)
    ref_values, _ = torch_impl.paged_decode_topk(q, k_cache, w, table, seq_lens, K_TOP, 0, 1024,
                                                 0.5, q_scale, k_scale)
    k, k_scale_flat = torch_impl.gather_pages(k_cache, table, seq_lens, k_scale)
    exact = exact_scores(q, k, w, indices, None, q_scale, k_scale_flat, 0.5)
    assert_same_selection(values, indices, ref_values, exact, seq_lens)


@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8])
def test_misa_matches_the_torch_implementation(dtype):
    q, k_cache, w, table, seq_lens, q_scale, k_scale = paged_site(dtype, seed=1)
    active = 8
    values, indices = ops.paged_decode_topk(q, k_cache, w, table, seq_lens, K_TOP, active, 1024,
                                            q_scale=q_scale, k_scale=k_scale)
    # The op's router, called alone (same kernel, same inputs: the same heads).
    w_folded = w if q_scale is None else w.float() * q_scale
    key_end = seq_lens.view(BATCH, 1)
    heads = route_heads(q[:, None], k_cache, w_folded[:, None], active, 1024, False,
                        torch.zeros_like(key_end), key_end, k_scale=k_scale, block_table=table,
                        seq_lens=seq_lens)[:, 0]
    k, k_scale_flat = torch_impl.gather_pages(k_cache, table, seq_lens, k_scale)
    q_real = real(q, q_scale)
    for b in range(BATCH):
        length = int(seq_lens[b])
        if length == 0:
            continue
        kb = k[b:b + 1, :length].float()
        if k_scale_flat is not None:
            kb = kb * k_scale_flat[b:b + 1, :length, None]
        r = reference.router_scores(q_real[b:b + 1, None], kb, w[b:b + 1, None], 1024,
                                    causal=False)[0, 0]
        ours = r[heads[b]].sort().values
        best = r.topk(active).values.sort().values
        assert ((ours - best).abs() / best.abs().clamp_min(1e-12)).max() < 1e-4, f"sequence {b}"
    key_start = torch.zeros_like(key_end)
    ref_values, _ = torch_impl.routed_topk(q[:, None], k, w[:, None], heads[:, None], K_TOP, 1.0,
                                           False, key_start, key_end, None, 0,
                                           None if q_scale is None else q_scale[:, None],
                                           k_scale_flat)
    exact = exact_scores(q, k, w, indices, heads, q_scale, k_scale_flat)
    assert_same_selection(values, indices, ref_values[:, 0], exact, seq_lens)


def test_paged_scores_equal_the_unpaged_decode_kernel():
    """The same keys, paged or gathered: the Triton decode paths return the same values."""
    q, k_cache, w, table, seq_lens, _, _ = paged_site(torch.bfloat16, seed=2)
    values, _ = ops.paged_decode_topk(q, k_cache, w, table, seq_lens, K_TOP)
    k, _ = torch_impl.gather_pages(k_cache, table, seq_lens)
    key_end = seq_lens.view(BATCH, 1)
    want, _ = ops.dense_topk(q[:, None], k, w[:, None], K_TOP, 1.0, False,
                             torch.zeros_like(key_end), key_end)
    # Same kernel, same key tiles, only the addressing differs.
    torch.testing.assert_close(values.sort(-1).values, want[:, 0].sort(-1).values, rtol=1e-6,
                               atol=1e-6)


def test_paged_pooled_keys_match_torch():
    q, k_cache, w, table, seq_lens, _, k_scale = paged_site(FP8, seed=3)
    got = pooled_keys(k_cache, 1024, k_scale, table, seq_lens)
    k, k_scale_flat = torch_impl.gather_pages(k_cache, table, seq_lens, k_scale)
    for b in (0, 1, 2, 3, 17):
        length = int(seq_lens[b])
        blocks = -(-length // 1024)
        if blocks:
            kb = k[b:b + 1, :length].float() * k_scale_flat[b:b + 1, :length, None]
            torch.testing.assert_close(got[b, :blocks], reference.pooled_keys(kb, 1024)[0],
                                       rtol=1e-5, atol=1e-6)
        assert not got[b, blocks:].any(), f"sequence {b}: blocks past its length must be zero"


def test_cached_pooled_keys_update_and_serve_decode():
    """A decode step with the router's pooled keys kept: the update after one more key per
    sequence equals a full recompute bit for bit, and decode reading them selects exactly what
    decode pooling the keys itself selects."""
    q, k_cache, w, table, seq_lens, _, _ = paged_site(torch.bfloat16, seed=4)
    # Sequences of length 0 stay empty (their first_token 0 recomputes everything anyway).
    previous = (seq_lens - 1).clamp_min(0)
    before = ops.paged_pooled_keys(k_cache, table, previous, 1024)
    updated = ops.paged_pooled_keys(k_cache, table, seq_lens, 1024, pooled=before,
                                    first_token=previous)
    assert torch.equal(updated, ops.paged_pooled_keys(k_cache, table, seq_lens, 1024))
    values, indices = ops.paged_decode_topk(q, k_cache, w, table, seq_lens, K_TOP, 8, 1024,
                                            pooled_keys=updated)
    want_values, want_indices = ops.paged_decode_topk(q, k_cache, w, table, seq_lens, K_TOP, 8,
                                                      1024)
    assert torch.equal(values.sort(-1).values, want_values.sort(-1).values)
    # The same scores chosen; keys tied at the k-th score may differ (the routed path appends
    # candidates with atomics, so their order, and with it which tied key is kept, varies).
    key_end = seq_lens.view(BATCH, 1)
    heads = route_heads(q[:, None], k_cache, w[:, None], 8, 1024, False,
                        torch.zeros_like(key_end), key_end, block_table=table,
                        seq_lens=seq_lens)[:, 0]
    k, _ = torch_impl.gather_pages(k_cache, table, seq_lens)
    finite = torch.isfinite(values)
    got = torch.where(finite, exact_scores(q, k, w, indices, heads), float("-inf"))
    want = torch.where(torch.isfinite(want_values),
                       exact_scores(q, k, w, want_indices, heads), float("-inf"))
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)


@pytest.mark.parametrize("active_heads", [0, 8])
def test_only_the_scales_of_visible_keys_are_checked(active_heads):
    """A serving pool's scales outside the visible keys (free pages, the unwritten slots of last
    pages) may hold anything, 0 or NaN: the op reads none of them, so its selection is the one
    with valid scales there, bit for bit. A bad scale at a visible key poisons exactly its
    sequence (checked_paging_kernel's scale check, split over the card)."""
    q, k_cache, w, table, seq_lens, q_scale, k_scale = paged_site(FP8, seed=5)
    position = torch.arange(MAX_KEYS, device="cuda")
    visible_pages = table.clamp_min(0).long()[:, position // PAGE]
    visible = position < seq_lens[:, None].long()
    seen = torch.zeros_like(k_scale, dtype=torch.bool)
    seen[visible_pages[visible], (position % PAGE).expand_as(visible)[visible]] = True
    pool = torch.where(seen, k_scale, 0.0)
    pool.view(-1)[(~seen).view(-1).nonzero()[0]] = float("nan")
    call = lambda scales: ops.paged_decode_topk(q, k_cache, w, table, seq_lens, K_TOP,
                                                active_heads, 1024, q_scale=q_scale,
                                                k_scale=scales)
    want_values, want_indices = call(torch.where(seen, k_scale, 1.0))
    values, indices = call(pool)
    assert torch.equal(values.sort(-1).values, want_values.sort(-1).values)
    finite = torch.isfinite(values)
    assert torch.equal((indices * finite).sort(-1).values,
                       (want_indices * torch.isfinite(want_values)).sort(-1).values)
    b, n = 5, int(seq_lens[5]) - 1  # the last key of sequence 5
    pool[table[b, n // PAGE], n % PAGE] = -1.0
    values, indices = call(pool)
    assert values[b].isnan().all() and (indices[b] == -1).all()
    others = torch.arange(BATCH, device="cuda") != b
    assert torch.equal(values[others].sort(-1).values, want_values[others].sort(-1).values)
