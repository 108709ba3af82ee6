"""The misa ops with a `mask` on a CUDA device, at DeepSeek-V3.2's indexer shape (H=64, D=128,
bf16, k_top=2048): every op with every mask form of tests/kernels/mask_forms.py (bool; additive
fp32/fp16/bf16 filled with -inf or finfo.min; [B,S,T], a [B,1,S,T] slice, [1,S,T], [S,T], a
stride-0 expand) against the chunked fp32 torch implementation on the same inputs, selections
compared by the exact scores of the keys they chose. Plus: no masked call reaches the torch
implementation, and masked rows with fewer visible keys than k_top select no key twice."""
import pytest
import torch

import misa_compile
from misa_compile.kernels import reference, torch_impl
from misa_compile.kernels.visibility import chunk_visibility

from ..kernels.mask_forms import FORM_IDS, MASK_FORMS, make_mask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ops = torch.ops.misa
QUERIES, KEYS, HEADS, K_TOP, SCALE = 1024, 8192, 64, 2048, 0.088
TOL = 2e-3
forms = pytest.mark.parametrize("form", MASK_FORMS, ids=FORM_IDS)


@pytest.fixture(scope="module")
def site():
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, QUERIES, HEADS, 128, generator=gen, device="cuda").bfloat16()
    k = torch.randn(1, KEYS, 128, generator=gen, device="cuda").bfloat16()
    w = torch.randn(1, QUERIES, HEADS, generator=gen, device="cuda").bfloat16()
    return q, k, w


def causal_base(queries, keys):
    pos = torch.arange(keys)
    return pos[None, :] <= (keys - queries + torch.arange(queries))[:, None]


def site_mask(form, seed=1, queries=QUERIES, keys=KEYS):
    """Causal visibility with 10% of the keys masked out, in the given form."""
    return make_mask(form, 1, queries, keys, seed=seed, keep=0.9, device="cuda",
                     base=causal_base(queries, keys))


def exact_scores(q, k, w, mask, heads=None, scale=SCALE, rows=64):
    """[B, S, T] fp32 index scores with the mask applied (-inf hidden), chunk by chunk."""
    if heads is not None:
        q, w = torch_impl.gather_heads(q, w, heads)
    batch, queries = q.shape[:2]
    out = torch.empty(batch, queries, k.shape[1], device=q.device)
    for start in range(0, queries, rows):
        part = slice(start, start + rows)
        scores = torch_impl._all_key_scores(q[:, part], k.float(), w[:, part])
        visible, bias = chunk_visibility(part, batch, queries, k.shape[1], q.device, False, None,
                                         None, mask)
        out[:, part] = torch_impl._finish_scores(scores, visible, bias, scale)
    return out


def assert_selection(values, indices, ref_values, scores):
    """Same finite counts; the chosen keys' exact scores equal the reference's top values and
    the returned values (relative to the largest score); no key chosen twice; no NaN."""
    finite = torch.isfinite(values)
    assert not torch.isnan(values).any()
    assert torch.equal(finite.sum(-1), torch.isfinite(ref_values).sum(-1))
    assert ((indices >= 0) & (indices < scores.shape[-1])).all()
    exact = scores.gather(-1, indices)
    ours = torch.where(finite, exact, float("-inf")).sort(-1).values
    ref = ref_values.sort(-1).values
    both = torch.isfinite(ours) & torch.isfinite(ref)
    magnitude = ref[torch.isfinite(ref)].abs().max()
    assert ((ours - ref).abs() * both).nan_to_num(0).max() / magnitude < TOL
    assert ((values - exact).abs() * finite).nan_to_num(0).max() / magnitude < TOL
    keys = torch.where(finite, indices, -1 - torch.arange(indices.shape[-1], device="cuda"))
    keys = keys.sort(-1).values
    assert not ((keys[..., 1:] == keys[..., :-1]) & (keys[..., 1:] >= 0)).any()


@forms
def test_dense_topk_with_mask(site, form):
    q, k, w = site
    mask = site_mask(form)
    values, indices = ops.dense_topk(q, k, w, K_TOP, SCALE, False, mask=mask)
    ref_values, _ = torch_impl.dense_topk(q, k, w, K_TOP, SCALE, False, None, None, mask, 16)
    assert_selection(values, indices, ref_values, exact_scores(q, k, w, mask))


@forms
def test_route_heads_and_routed_topk_with_mask(site, form):
    q, k, w = site
    mask = site_mask(form, seed=2)
    heads = ops.route_heads(q, k, w, 8, 1024, causal=False, mask=mask)
    r = reference.router_scores(q, k, w, 1024, False, mask=mask)
    chosen = r.gather(-1, heads).sort(-1).values
    best = r.topk(8, dim=-1).values.sort(-1).values
    assert ((chosen - best).abs() / best.abs().amax(-1, keepdim=True)).max() < 1e-4
    values, indices = ops.routed_topk(q, k, w, heads, K_TOP, SCALE, False, mask=mask)
    ref_values, _ = torch_impl.routed_topk(q, k, w, heads, K_TOP, SCALE, False, None, None,
                                           mask, 16)
    assert_selection(values, indices, ref_values, exact_scores(q, k, w, mask, heads))


@forms
def test_rerank_topk_with_mask(site, form):
    q, k, w = site
    mask = site_mask(form, seed=3)
    gen = torch.Generator(device="cuda").manual_seed(3)
    candidates = torch.rand(1, QUERIES, KEYS, generator=gen, device="cuda").topk(4096).indices
    values, indices = ops.rerank_topk(q, k, w, candidates, K_TOP, SCALE, False, mask=mask)
    ref_values, _ = torch_impl.rerank_topk(q, k, w, candidates, K_TOP, SCALE, False, None, None,
                                           mask, 16)
    assert_selection(values, indices, ref_values, exact_scores(q, k, w, mask))


@forms
def test_hisa_candidates_with_mask(site, form):
    q, k, w = site
    # Sparser: blocks of 128 keys then differ in how many keys they show.
    mask = make_mask(form, 1, QUERIES, KEYS, seed=4, keep=0.02, device="cuda",
                     base=causal_base(QUERIES, KEYS))
    ours = ops.hisa_candidates(q, k, w, 128, 32, causal=False, mask=mask)
    ref = torch_impl.hisa_candidates(q, k, w, 128, 32, False, None, None, mask, 0)
    assert ours.shape == ref.shape
    # Compare kept blocks by their exact block scores (hidden blocks -inf, the first and last
    # visible ones forced to +inf): bf16 block means may swap near-ties.
    visible, _ = chunk_visibility(slice(None), 1, QUERIES, KEYS, q.device, False, None, None,
                                  mask)
    seen = reference.block_visibility(visible, 128)
    beta = torch.einsum("bshd,bnd->bshn", q.float(), reference.pooled_keys(k, 128)).relu_()
    beta = torch.einsum("bshn,bsh->bsn", beta, w.float()).masked_fill(~seen, float("-inf"))
    beta = torch_impl.force_first_and_last_blocks(beta, seen)

    def kept_scores(ids):
        return beta.gather(-1, ids[..., ::128] // 128).sort(-1).values
    a, b = kept_scores(ours), kept_scores(ref)
    assert torch.equal(torch.isfinite(a), torch.isfinite(b)) and torch.equal(a == float("inf"),
                                                                              b == float("inf"))
    finite = torch.isfinite(b)
    assert ((a - b).abs() * finite).nan_to_num(0).max() / b[finite].abs().max() < 2e-2


@pytest.mark.parametrize("form", MASK_FORMS[::2], ids=FORM_IDS[::2])
def test_few_queries_with_mask(form):
    gen = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(2, 3, HEADS, 128, generator=gen, device="cuda").bfloat16()
    k = torch.randn(2, 16384, 128, generator=gen, device="cuda").bfloat16()
    w = torch.randn(2, 3, HEADS, generator=gen, device="cuda").bfloat16()
    mask = make_mask(form, 2, 3, 16384, seed=6, keep=0.5, device="cuda")
    values, indices = ops.dense_topk(q, k, w, K_TOP, SCALE, False, mask=mask)
    ref_values, _ = torch_impl.dense_topk(q, k, w, K_TOP, SCALE, False, None, None, mask, 0)
    assert_selection(values, indices, ref_values, exact_scores(q, k, w, mask))


def test_no_masked_call_reaches_the_torch_implementation(site, monkeypatch):
    q, k, w = site
    for name in ("dense_topk", "route_heads", "routed_topk", "rerank_topk", "hisa_candidates"):
        def refuse(*args, _name=name, **kwargs):
            raise AssertionError(f"torch_impl.{_name} was called on CUDA")
        monkeypatch.setattr(torch_impl, name, refuse)
    bool_mask = causal_base(QUERIES, KEYS).cuda()[None, None].expand(1, 1, QUERIES, KEYS)[:, 0]
    additive = torch.zeros(QUERIES, KEYS, dtype=torch.bfloat16, device="cuda").masked_fill(
        ~bool_mask[0], torch.finfo(torch.bfloat16).min)
    for variant in ("dense", "misa", "misa_hier", "hisa"):
        config = misa_compile.MisaConfig(variant=variant, candidates=4096)
        for mask in (bool_mask, additive):
            misa_compile.indexer_topk(q, k, w, K_TOP, config, scale=SCALE, causal=False,
                                      mask=mask)
    torch.cuda.synchronize()


@pytest.mark.parametrize("variant", ["dense", "misa_hier"])
def test_rows_with_fewer_visible_keys_than_k_top_select_no_key_twice(variant):
    # A sliding window of 1000 keys at 2048 x 16K: every row has fewer visible keys than
    # k_top (and than misa_hier's 4096 candidates) on the sampled-threshold path.
    gen = torch.Generator(device="cuda").manual_seed(7)
    q = torch.randn(1, 2048, HEADS, 128, generator=gen, device="cuda").bfloat16()
    k = torch.randn(1, 16384, 128, generator=gen, device="cuda").bfloat16()
    w = torch.randn(1, 2048, HEADS, generator=gen, device="cuda").bfloat16()
    last = 16384 - 2048 + torch.arange(2048, device="cuda")
    pos = torch.arange(16384, device="cuda")
    mask = (pos <= last[:, None]) & (pos > last[:, None] - 1000)
    config = misa_compile.MisaConfig(variant=variant, candidates=4096)
    values, indices = misa_compile.indexer_topk(q, k, w, K_TOP, config, scale=SCALE,
                                                causal=False, mask=mask)
    assert (torch.isfinite(values).sum(-1) == 1000).all()
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all()
    ref_values, _ = torch_impl.dense_topk(q, k, w, K_TOP, SCALE, False, None, None, mask, 16)
    assert_selection(values, indices, ref_values, exact_scores(q, k, w, mask))
