"""The Triton kernels on a CUDA device, in bf16, against torch computing the same math: each
building block alone (scores, threshold, candidate lists, in-register top-k, router, per-query
scores), then the misa ops end to end against the float64 references. Selections are
compared by the scores they gathered, never by index order."""
import pytest
import torch
from torch._library.triton import set_wrap_triton_enabled

import misa_compile  # noqa: F401
from misa_compile.kernels import reference, torch_impl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

if torch.cuda.is_available():
    from misa_compile.kernels.triton.selection.candidate_topk import candidate_topk
    from misa_compile.kernels.triton.scoring.index_scores import index_scores
    from misa_compile.kernels.triton.scoring.query_scores import query_scores
    from misa_compile.kernels.triton.scoring.router_scores import pooled_keys
    from misa_compile.kernels.triton.launch.route_heads import route_heads
    from misa_compile.kernels.triton.selection.row_topk import topk_rows
    from misa_compile.kernels.triton.selection.sample_threshold import sample_threshold

ops = torch.ops.misa


def inputs(batch, queries, keys, heads=8, dim=128, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, queries, heads, dim, generator=gen, device="cuda").bfloat16()
    k = torch.randn(batch, keys, dim, generator=gen, device="cuda").bfloat16()
    w = torch.randn(batch, queries, heads, generator=gen, device="cuda").bfloat16()
    return q, k, w


def torch_scores(q, k, w, causal, ks=None, ke=None, scale=1.0):
    return reference.dense_scores(q, k, w, scale, causal, ks, ke).float()


def sorted_desc(x):
    return x.sort(-1, descending=True).values


@pytest.mark.parametrize("causal,ragged", [(True, False), (False, True), (True, True)])
def test_index_scores_full_matches_torch(causal, ragged):
    q, k, w = inputs(2, 70, 1500)
    ks = torch.randint(0, 400, (2, 70), device="cuda") if ragged else None
    ke = ks + torch.randint(0, 1200, (2, 70), device="cuda") if ragged else None
    out = torch.empty(2, 70, 1500, device="cuda")
    index_scores(q, k, w, rows=70, row0=0, causal=causal, key_start=ks, key_end=ke, scale=0.5,
                 n_cols=1500, out=out)
    ref = torch_scores(q, k, w, causal, ks, ke, 0.5)
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref)), (
        f"visibility differs in {(torch.isfinite(out) != torch.isfinite(ref)).sum()} entries")
    finite = torch.isfinite(ref)
    err = (out[finite] - ref[finite]).abs().max() / ref[finite].abs().max()
    assert err < 1e-5


def test_index_scores_of_gathered_routed_heads_sampled_match_torch():
    q, k, w = inputs(1, 64, 3000, heads=16)
    heads = torch.stack([torch.randperm(16, device="cuda")[:4] for _ in range(64)])[None]
    q_routed, w_routed = torch_impl.gather_heads(q, w, heads)
    out = torch.empty(1, 64, 3000 // 16 + 1, device="cuda")
    index_scores(q_routed, k, w_routed, rows=64, row0=0, causal=True, key_start=None,
                 key_end=None, scale=1.0, n_cols=out.shape[2], key_stride=16, out=out)
    ref = reference.routed_scores(q, k, w, heads, 1.0, True).float()[..., ::16]
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    finite = torch.isfinite(ref)
    assert (out[finite] - ref[finite]).abs().max() / ref[finite].abs().max() < 1e-5


# The first call of each head count tunes the EMIT kernel inside the call, so the counts also
# show whether the tuning runs were reset: launched plainly (as the eager op launches it,
# register.py) and through torch's wrap_triton (as traced and exported programs launch it).
@pytest.mark.parametrize("heads,plain", [(8, True), (5, False)])
def test_emit_keeps_exactly_the_scores_above_threshold(heads, plain):
    q, k, w = inputs(1, 64, 5000, heads=heads)
    ref = torch_scores(q, k, w, True)
    # A threshold halfway between the 300th and 301st largest scores: rounding cannot move
    # any score across it. Where those two tie (exact zeros: every head's ReLU is 0, which
    # happens with 5 heads), every score equal to the threshold is kept, so more than 300.
    top = ref.topk(301, dim=-1).values
    lo = ((top[..., 299] + top[..., 300]) / 2).reshape(-1)
    expected = (ref[0] >= lo[:, None]).sum(-1).to(torch.int32)
    assert (expected >= 300).all()
    cap = 4096
    cand_val = torch.empty(64, cap, device="cuda")
    cand_idx = torch.empty(64, cap, dtype=torch.int32, device="cuda")
    count = torch.zeros(64, dtype=torch.int32, device="cuda")
    with set_wrap_triton_enabled(not plain):
        index_scores(q, k, w, rows=64, row0=0, causal=True, key_start=None, key_end=None,
                     scale=1.0, n_cols=5000, emit=(lo, cand_val, cand_idx, count))
    assert torch.equal(count, expected)
    for row in (0, 31, 63):
        n = int(count[row])
        ids = cand_idx[row, :n].long()
        assert ids.unique().numel() == n
        assert torch.allclose(cand_val[row, :n], ref[0, row, ids], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,k_top", [(1500, 1500), (3000, 2048), (700, 2048), (4096, 100)])
def test_candidate_topk_matches_torch_topk(n, k_top):
    gen = torch.Generator(device="cuda").manual_seed(n)
    x = torch.randn(2, 5, n, generator=gen, device="cuda")
    x[0, 0, n // 2:] = float("-inf")
    x[1, 1] = (x[1, 1] * 2).round()  # ties
    K = min(k_top, n)
    values = torch.empty(2, 5, k_top, device="cuda")
    indices = torch.empty(2, 5, k_top, dtype=torch.int64, device="cuda")
    candidate_topk(x, k_top, n, values, indices)
    ref = torch.cat([x.topk(K, dim=-1).values,
                     torch.full((2, 5, k_top - K), float("-inf"), device="cuda")], -1)
    assert torch.equal(sorted_desc(values), sorted_desc(ref))
    assert torch.equal(sorted_desc(x.gather(-1, indices[..., :K])), sorted_desc(ref[..., :K]))
    assert ((indices >= 0) & (indices < n)).all()


def test_sample_threshold_is_the_rank_value():
    x = torch.randn(3, 4, 5000, device="cuda")
    x[0, 0, :4990] = float("-inf")
    lo = torch.empty(12, device="cuda")
    sample_threshold(x, 100, 5000, lo)
    ref = sorted_desc(x)[..., 99].reshape(-1)
    assert torch.equal(lo, ref)


@pytest.mark.parametrize("rows,width", [(64, 65536), (7, 70001)])
def test_topk_rows_matches_torch_topk(rows, width):
    x = torch.randn(1, rows, width, device="cuda")
    values = torch.empty(1, rows, 2048, device="cuda")
    indices = torch.empty(1, rows, 2048, dtype=torch.int64, device="cuda")
    topk_rows(x, 2048, values, indices)
    ref = x.topk(2048, dim=-1).values
    assert torch.equal(sorted_desc(values), sorted_desc(ref))
    assert torch.equal(sorted_desc(x.gather(-1, indices)), sorted_desc(ref))


@pytest.mark.parametrize("gather", [False, True])
def test_query_scores_matches_torch(gather):
    q, k, w = inputs(3, 2, 5000, heads=64)
    ks = torch.tensor([[0, 10], [100, 0], [0, 4000]], device="cuda")
    ke = torch.tensor([[5000, 3000], [200, 4999], [4500, 4001]], device="cuda")
    ref = torch_scores(q, k, w, False, ks, ke)
    if gather:
        cand = torch.randint(-2, 5002, (3, 2, 300), device="cuda")
        out = torch.empty(3, 2, 300, device="cuda")
        query_scores(q, k, w, out, rows=2, row0=0, causal=False, key_start=ks, key_end=ke,
                     scale=1.0, candidates=cand)
        valid = (cand >= 0) & (cand < 5000)
        ref = torch.where(valid, ref.gather(-1, cand.clamp(0, 4999)), float("-inf"))
    else:
        out = torch.empty(3, 2, 5000, device="cuda")
        query_scores(q, k, w, out, rows=2, row0=0, causal=False, key_start=ks, key_end=ke,
                     scale=1.0)
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    finite = torch.isfinite(ref)
    assert (out[finite] - ref[finite]).abs().max() / ref[finite].abs().max() < 1e-5


def test_pooled_keys_and_router_pick_the_top_heads():
    q, k, w = inputs(2, 40, 5000, heads=16)
    kbar = pooled_keys(k, 512)
    assert torch.allclose(kbar, reference.pooled_keys(k, 512), rtol=1e-5, atol=1e-6)
    heads = route_heads(q, k, w, 4, 512, True, None, None)
    r = reference.router_scores(q, k, w, 512, True)
    chosen = r.gather(-1, heads).sort(-1).values
    best = r.topk(4, dim=-1).values.sort(-1).values
    assert ((chosen - best).abs() / best.abs().clamp_min(1e-12)).max() < 1e-4


def test_ops_match_references_end_to_end():
    q, k, w = inputs(2, 48, 3000, heads=16, seed=3)
    kw = dict(scale=0.3, causal=True)
    values, indices = ops.dense_topk(q, k, w, 300, **kw)
    ref_values, _ = reference.dense_topk(q, k, w, 300, **kw)
    scores = reference.dense_scores(q, k, w, **kw)
    assert torch.allclose(sorted_desc(scores.gather(-1, indices)).float(),
                          sorted_desc(ref_values).float(), rtol=1e-4, atol=1e-4)
    heads = ops.route_heads(q, k, w, 4, 512, "score", True)
    values, indices = ops.routed_topk(q, k, w, heads, 300, **kw)
    routed = reference.routed_scores(q, k, w, heads, **kw)
    assert torch.allclose(sorted_desc(routed.gather(-1, indices)).float(),
                          sorted_desc(routed.topk(300).values).float(), rtol=1e-4, atol=1e-4)
    _, cand = ops.routed_topk(q, k, w, heads, 1000, **kw)
    values, indices = ops.rerank_topk(q, k, w, cand, 300, **kw)
    within = scores.masked_fill(~torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, cand, True),
                                float("-inf"))
    assert torch.allclose(sorted_desc(scores.gather(-1, indices)).float(),
                          sorted_desc(within.topk(300).values).float(), rtol=1e-4, atol=1e-4)
    blocks = ops.hisa_candidates(q, k, w, 128, 4, True)
    ref_blocks = torch_impl.hisa_candidates(q, k, w, 128, 4, True, None, None, None, 0)
    assert blocks.shape == ref_blocks.shape


def test_decode_ragged_batch_has_minus_inf_tails_and_no_nan():
    q, k, w = inputs(4, 1, 9000, heads=64, seed=5)
    ends = torch.tensor([[9000], [10], [5000], [2049]], device="cuda")
    starts = torch.zeros_like(ends)
    values, indices = ops.dense_topk(q, k, w, 2048, 1.0, False, starts, ends)
    assert not torch.isnan(values).any()
    assert ((indices >= 0) & (indices < 9000)).all()
    assert torch.equal(torch.isfinite(values).sum(-1).flatten().cpu(),
                       torch.tensor([2048, 10, 2048, 2048]))
    ref_values, _ = reference.dense_topk(q, k, w, 2048, 1.0, False, starts, ends)
    scores = reference.dense_scores(q, k, w, 1.0, False, starts, ends)
    gathered = torch.where(torch.isfinite(values), scores.gather(-1, indices).float(),
                           float("-inf"))
    assert torch.allclose(sorted_desc(gathered), sorted_desc(ref_values).float(), rtol=1e-4,
                          atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("variant", ["dense", "misa", "misa_hier", "hisa"])
def test_every_variant_runs_on_wider_dtypes_at_deepseek_head_shape(variant, dtype):
    # H=64, D=128 in fp32 once needed more shared memory than the card has (re-rank, decode).
    q, k, w = (t.to(dtype) for t in inputs(1, 64, 5000, heads=64, seed=7))
    config = misa_compile.MisaConfig(variant=variant, candidates=1024, hisa_block=128,
                                     hisa_blocks=8)
    values, indices = misa_compile.indexer_topk(q, k, w, 256, config)
    assert values.shape == (1, 64, 256) and torch.isfinite(values).all()
    assert ((indices >= 0) & (indices < 5000)).all()
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all(), "a key was selected twice"
    if variant == "dense":
        # Ties aside, the dense selection is unique: same exact scores as the CPU op's.
        _, cpu_indices = misa_compile.indexer_topk(q.cpu(), k.cpu(), w.cpu(), 256, config)
        scores = reference.dense_scores(q, k, w).float().cpu()
        assert torch.allclose(sorted_desc(scores.gather(-1, indices.cpu())),
                              sorted_desc(scores.gather(-1, cpu_indices)), rtol=1e-3, atol=1e-3)
