"""FP8 e4m3 q and k with dequantization scales (q_scale per query token and head, k_scale per key
token) through every misa op on a CUDA device (the Triton kernels: FP8 operands in the dots,
q_scale folded into w, k_scale on each key's score and in the pooled keys), at DeepSeek-V3.2's
shape (H=64, D=128, k_top=2048), against the chunked torch implementation on the same inputs.

Selections are compared by the fp32 scores, on the dequantized inputs, of the keys they chose
(never by index order), plus finite counts, NaN, index range and duplicates. FP8 products are
exact in fp32; the tolerance covers fp32 accumulation order and the reduced-precision
accumulation inside one FP8 matrix instruction on Hopper."""
import pytest
import torch

import misa_compile  # noqa: F401  (registers the ops and their CUDA kernels)
from misa_compile.kernels import reference, torch_impl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ops = torch.ops.misa
DEVICE = "cuda"
FP8 = torch.float8_e4m3fn
# Relative to the largest selected score of the row set (as bench/check_gpu.py measures).
TOL = 2e-3


def quantize(x, gen):
    """(x8, scale fp32): per-row FP8 quantization after a random per-row gain of 2^-4..2^4, so
    the scales differ a lot from row to row (a dropped scale changes the selection)."""
    gain = torch.exp2(torch.randint(-4, 5, x.shape[:-1], generator=gen, device=x.device).float())
    x = x.float() * gain[..., None]
    scale = (x.abs().amax(-1) / torch.finfo(FP8).max).clamp_min(1e-8)
    return (x / scale[..., None]).to(FP8), scale


def fp8_inputs(batch, queries, keys, heads=64, dim=128, seed=0):
    """(q8, k8, w bf16, q_scale, k_scale)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q8, q_scale = quantize(torch.randn(batch, queries, heads, dim, generator=gen, device=DEVICE),
                           gen)
    k8, k_scale = quantize(torch.randn(batch, keys, dim, generator=gen, device=DEVICE), gen)
    w = (torch.randn(batch, queries, heads, generator=gen, device=DEVICE) * heads ** -0.5)
    return q8, k8, w.bfloat16(), q_scale, k_scale


def real(q8, k8, q_scale, k_scale):
    """fp32 dequantized q and k, spelled here (not through torch_impl)."""
    return q8.float() * q_scale[..., None], k8.float() * k_scale[..., None]


def gathered_scores(q, k, w, indices, scale=1.0, heads=None, chunk=64):
    """fp32 [B, S, n] index scores of keys `indices` (clamped into range) on real q, k."""
    if heads is not None:
        q, w = torch_impl.gather_heads(q, w, heads)
    out = torch.empty(indices.shape, dtype=torch.float32, device=q.device)
    idx = indices.long().clamp(0, k.shape[1] - 1)
    for b in range(q.shape[0]):
        for row0 in range(0, q.shape[1], chunk):
            rows = slice(row0, row0 + chunk)
            keys = k[b][idx[b, rows]]  # [c, n, D]
            logits = torch.einsum("chd,cnd->chn", q[b, rows], keys).relu_()
            out[b, rows] = torch.einsum("chn,ch->cn", logits, w[b, rows].float()) * scale
    return out


def assert_same_selection(values, indices, ref_values, q, k, w, scale=1.0, heads=None,
                          label=""):
    """The kernel's selection against the torch implementation's values: same finite counts,
    the chosen keys' exact scores equal the reference's top scores (sorted) and the returned
    values, no NaN, indices in range, no key chosen twice."""
    T = k.shape[1]
    finite = torch.isfinite(values)
    ref_finite = torch.isfinite(ref_values)
    assert not torch.isnan(values).any(), label
    assert ((indices >= 0) & (indices < T)).all(), label
    mismatched = int((finite.sum(-1) != ref_finite.sum(-1)).sum())
    assert mismatched == 0, f"{label}: {mismatched} rows select a different number of keys"
    exact = gathered_scores(q, k, w, indices, scale, heads)
    magnitude = ref_values[ref_finite].abs().max().clamp_min(1e-30)
    value_err = float(((values - exact).abs() * finite).nan_to_num(0).max() / magnitude)
    assert value_err < TOL, f"{label}: returned values off their keys' scores by {value_err:.2e}"
    ours = torch.where(finite, exact, float("-inf")).sort(-1, descending=True).values
    want = ref_values.sort(-1, descending=True).values
    both = torch.isfinite(ours) & torch.isfinite(want)
    select_err = float(((ours - want).abs() * both).nan_to_num(0).max() / magnitude)
    assert select_err < TOL, f"{label}: selected scores off the reference top by {select_err:.2e}"
    keys = torch.where(finite, indices, -1 - torch.arange(indices.shape[-1], device=DEVICE))
    keys = keys.sort(-1).values
    assert not ((keys[..., 1:] == keys[..., :-1]) & (keys[..., 1:] >= 0)).any(), \
        f"{label}: a key selected twice"


def ragged_ranges(batch, queries, keys, seed):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    start = torch.randint(0, keys // 3, (batch, queries), generator=gen, device=DEVICE)
    length = torch.randint(0, keys, (batch, queries), generator=gen, device=DEVICE)
    return start, (start + length).clamp(max=keys)


@pytest.mark.parametrize("batch,queries,keys,causal,ragged", [
    (1, 512, 16384, True, False),   # 512 queries at the end of 16K keys
    (2, 300, 5000, False, True),    # ragged key ranges, T not a multiple of any tile
    (2, 64, 1500, True, False),     # T < k_top: -inf tails
    (4, 1, 9000, False, True),      # decode (per-query kernel), ragged lengths
])
def test_dense_router_and_routed_topk(batch, queries, keys, causal, ragged):
    q8, k8, w, q_scale, k_scale = fp8_inputs(batch, queries, keys, seed=keys)
    ks, ke = ragged_ranges(batch, queries, keys, keys) if ragged else (None, None)
    vis = (causal, ks, ke, None, 0)
    scales = dict(q_scale=q_scale, k_scale=k_scale)
    q, k = real(q8, k8, q_scale, k_scale)

    values, indices = ops.dense_topk(q8, k8, w, 2048, 0.088, causal, ks, ke, **scales)
    ref_values, _ = torch_impl.dense_topk(q8, k8, w, 2048, 0.088, *vis, q_scale, k_scale)
    assert_same_selection(values, indices, ref_values, q, k, w, 0.088, label="dense")

    heads = ops.route_heads(q8, k8, w, 8, 1024, "score", causal, ks, ke, **scales)
    router = reference.router_scores(q8, k8, w, 1024, causal, ks, ke, **scales)
    chosen = router.gather(-1, heads).sort(-1).values
    best = router.topk(8, dim=-1).values.sort(-1).values
    assert ((chosen - best).abs() / best.abs().clamp_min(1e-12)).max() < 1e-4
    assert (heads.sort(-1).values.diff(dim=-1) > 0).all(), "a head routed twice"

    values, indices = ops.routed_topk(q8, k8, w, heads, 2048, 1.0, causal, ks, ke, **scales)
    ref_values, _ = torch_impl.routed_topk(q8, k8, w, heads, 2048, 1.0, *vis, q_scale, k_scale)
    assert_same_selection(values, indices, ref_values, q, k, w, heads=heads, label="routed")


def test_rerank_and_hisa_at_deepseek_shape():
    q8, k8, w, q_scale, k_scale = fp8_inputs(1, 512, 16384, seed=7)
    scales = dict(q_scale=q_scale, k_scale=k_scale)
    q, k = real(q8, k8, q_scale, k_scale)
    heads = ops.route_heads(q8, k8, w, 8, 1024, "score", True, **scales)
    _, candidates = ops.routed_topk(q8, k8, w, heads, 8192, 1.0, True, **scales)
    values, indices = ops.rerank_topk(q8, k8, w, candidates, 2048, 1.0, True, **scales)
    ref_values, _ = torch_impl.rerank_topk(q8, k8, w, candidates, 2048, 1.0, True, None, None,
                                           None, 0, q_scale, k_scale)
    assert_same_selection(values, indices, ref_values, q, k, w, label="misa_hier rerank")

    kept = ops.hisa_candidates(q8, k8, w, 128, 64, True, **scales)
    ref_kept = torch_impl.hisa_candidates(q8, k8, w, 128, 64, True, None, None, None, 0,
                                          q_scale, k_scale)
    assert kept.shape == ref_kept.shape
    # Kept blocks compared by their exact block scores (the kernel's bf16 block means may swap
    # near-ties); the first and last block are forced in both.
    beta = torch.einsum("bshd,bnd->bshn", q, reference.pooled_keys(k, 128)).relu_()
    beta = torch.einsum("bshn,bsh->bsn", beta, w.float())

    def kept_scores(ids):
        return beta.gather(-1, ids[..., ::128].clamp_min(0) // 128).sort(-1).values

    ours, want = kept_scores(kept), kept_scores(ref_kept)
    assert ((ours - want).abs().max() / want.abs().max()) < 2e-2
    values, indices = ops.rerank_topk(q8, k8, w, kept, 2048, 1.0, True, **scales)
    ref_values, _ = torch_impl.rerank_topk(q8, k8, w, kept, 2048, 1.0, True, None, None, None,
                                           0, q_scale, k_scale)
    assert_same_selection(values, indices, ref_values, q, k, w, label="hisa refine")


def test_fp8_query_beside_bf16_keys_with_scales():
    """Mixed operands (the dot runs in bf16: e4m3 -> bf16 is exact) and a scale on a bf16 key."""
    q8, k8, w, q_scale, k_scale = fp8_inputs(1, 256, 8192, seed=11)
    k16 = k8.float().bfloat16()
    scales = dict(q_scale=q_scale, k_scale=k_scale)
    q, k = real(q8, k16, q_scale, k_scale)
    values, indices = ops.dense_topk(q8, k16, w, 2048, 1.0, True, **scales)
    ref_values, _ = torch_impl.dense_topk(q8, k16, w, 2048, 1.0, True, None, None, None, 0,
                                          q_scale, k_scale)
    assert_same_selection(values, indices, ref_values, q, k, w, label="mixed")


@pytest.mark.parametrize("variant", ["dense", "misa", "misa_hier", "hisa"])
def test_indexer_topk_with_scales_equals_dequantized_inputs(variant):
    """The scales reach every op of each chain: the FP8 call selects what the same chain
    selects on the dequantized fp32 inputs (compared by exact scores)."""
    q8, k8, w, q_scale, k_scale = fp8_inputs(1, 128, 6000, seed=13)
    q, k = real(q8, k8, q_scale, k_scale)
    config = misa_compile.MisaConfig(variant, candidates=4096, hisa_blocks=16)
    values, indices = misa_compile.indexer_topk(q8, k8, w, 512, config, q_scale=q_scale,
                                                k_scale=k_scale)
    ref_values, ref_indices = misa_compile.indexer_topk(q, k, w, 512, config)
    if variant == "dense":
        assert_same_selection(values, indices, ref_values, q, k, w, label=variant)
        return
    # Routing (and HISA's bf16 block means) may differ on near ties between the two calls'
    # roundings: compare the overlap of the selections. A dropped scale would reorder the heads
    # and keys of whole rows (the per-row gains span 2^-4..2^4).
    ours = torch.zeros(1, 128, 6000, dtype=torch.bool, device=DEVICE).scatter_(-1, indices, True)
    theirs = torch.zeros_like(ours).scatter_(-1, ref_indices, True)
    overlap = (ours & theirs).sum() / theirs.sum()
    assert overlap > 0.9, f"{variant}: only {float(overlap):.3f} of the selection shared"
