"""The Triton kernels with the ops' `mask` argument, run by Triton's CPU interpreter
(TRITON_INTERPRET=1) on tiny fp32/fp16 inputs against the float64 references: each kernel path
(scores in full, the sampled-threshold + candidate-list path, the few-queries per-query path,
the router, the re-rank, HISA's block filter, the CUDA op implementations end to end) with every
mask form of mask_forms.py. Selections are compared by the reference scores of the chosen keys
(ties are unspecified). Also: broadcastable masks through the ops on CPU, their errors, and the
one-time warning of a CUDA fallback."""
import os
import warnings

import pytest
import torch

from misa_compile.kernels import reference, torch_impl
from misa_compile.kernels.visibility import block_visibility

from .mask_forms import FORM_IDS, MASK_FORMS, make_mask

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU interpreter tests (the GPU has tests/gpu)")

if os.environ.get("TRITON_INTERPRET") == "1":
    from misa_compile.kernels.triton import register
    from misa_compile.kernels.triton.launch.hisa_candidates import hisa_candidates
    from misa_compile.kernels.triton.scoring.index_scores import index_scores
    from misa_compile.kernels.triton.launch.rerank_topk import rerank_topk
    from misa_compile.kernels.triton.launch.route_heads import route_heads
    from misa_compile.kernels.triton.selection.row_topk import plan_selection
    from misa_compile.kernels.triton.launch import scored_topk as scored_topk_module
    from misa_compile.kernels.triton.launch.scored_topk import scored_topk
    from misa_compile.kernels.triton.scoring.routed_inputs import routed_inputs

NEG_INF = float("-inf")
forms = pytest.mark.parametrize("form", MASK_FORMS, ids=FORM_IDS)


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


def assert_same_selection(values, indices, scores, k_top):
    """The chosen keys' reference scores are the reference top-k values (as sorted lists), the
    returned values are those scores, -inf marks exactly the missing tail, indices in range."""
    ref_values = scores.topk(min(k_top, scores.shape[-1]), dim=-1).values
    finite = torch.isfinite(values)
    assert torch.equal(finite.sum(-1), torch.isfinite(ref_values).sum(-1))
    assert ((indices >= 0) & (indices < scores.shape[-1])).all()
    gathered = torch.where(finite, scores.gather(-1, indices), NEG_INF)
    expect = ref_values.sort(-1).values
    torch.testing.assert_close(gathered.sort(-1).values, expect, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(torch.where(finite, values.double(), NEG_INF).sort(-1).values,
                               expect, rtol=2e-3, atol=2e-3)


def routed_heads(batch, queries, heads, active, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(heads, generator=gen)[:active]
                        for _ in range(batch * queries)]).view(batch, queries, active)


@forms
def test_full_scores_follow_the_mask(form):
    q, k, w = make(2, 20, 40, 4, dtype=torch.float16)
    mask = make_mask(form, 2, 20, 40, seed=1)
    out = torch.empty(2, 20, 40)
    index_scores(q, k, w, rows=20, row0=0, causal=True, key_start=None, key_end=None,
                 scale=0.5, n_cols=40, out=out, mask=mask)
    ref = reference.dense_scores(q, k, w, 0.5, True, mask=mask)
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite].double(), ref[finite], rtol=2e-3, atol=2e-3)


@forms
@pytest.mark.parametrize("routed", [False, True], ids=["dense", "routed"])
def test_direct_selection_with_mask(form, routed):
    # 40 keys fit a candidate list: scores in full, then the in-register top-k.
    q, k, w = make(2, 20, 40, 4, seed=2)
    mask = make_mask(form, 2, 20, 40, seed=3)
    heads = routed_heads(2, 20, 4, 2, 4) if routed else None
    ks = torch.randint(0, 10, (2, 20), generator=torch.Generator().manual_seed(5))
    q_in, w_in = scored_inputs(q, w, heads)
    values, indices = scored_topk(q_in, k, w_in, 8, 1.0, False, ks, ks + 25, mask=mask)
    scores = (reference.routed_scores(q, k, w, heads, 1.0, False, ks, ks + 25, mask) if routed
              else reference.dense_scores(q, k, w, 1.0, False, ks, ks + 25, mask))
    assert_same_selection(values, indices, scores, 8)


@forms
@pytest.mark.parametrize("routed", [False, True], ids=["dense", "routed"])
def test_sampled_threshold_path_with_mask(form, routed):
    # 300 keys exceed the candidate capacity for k=10: sample, threshold, emit, select.
    keys, k_top = 300, 10
    assert not plan_selection(k_top, keys).direct
    q, k, w = make(1, 16, keys, 4, seed=6)
    mask = make_mask(form, 1, 16, keys, seed=7)
    heads = routed_heads(1, 16, 4, 2, 8) if routed else None
    q_in, w_in = scored_inputs(q, w, heads)
    values, indices = scored_topk(q_in, k, w_in, k_top, 1.0, True, None, None, mask=mask)
    scores = (reference.routed_scores(q, k, w, heads, mask=mask) if routed
              else reference.dense_scores(q, k, w, mask=mask))
    assert_same_selection(values, indices, scores, k_top)


@forms
def test_few_queries_path_with_mask(form):
    # Fewer than 16 queries per sequence: the per-query kernel, then top-k of the rows.
    q, k, w = make(3, 2, 80, 4, dtype=torch.float16, seed=9)
    mask = make_mask(form, 3, 2, 80, seed=10)
    values, indices = scored_topk(q, k, w, 8, 1.0, True, None, None, mask=mask)
    assert_same_selection(values, indices, reference.dense_scores(q, k, w, mask=mask), 8)


@forms
def test_router_with_mask_picks_the_reference_top_heads(form):
    q, k, w = make(2, 20, 70, 6, seed=11)
    # Sparse masks leave some blocks of 8 keys without a visible key.
    mask = make_mask(form, 2, 20, 70, seed=12, keep=0.1)
    heads = route_heads(q, k, w, 3, 8, True, None, None, mask=mask)
    r = reference.router_scores(q, k, w, 8, True, mask=mask)
    torch.testing.assert_close(r.gather(-1, heads).sort(-1).values,
                               r.topk(3, dim=-1).values.sort(-1).values)
    assert (heads.sort(-1).values.diff(dim=-1) > 0).all()


@forms
def test_rerank_with_mask_matches_scoring_only_the_candidates(form):
    q, k, w = make(2, 18, 60, 4, seed=13)
    mask = make_mask(form, 2, 18, 60, seed=14)
    cand = torch.randint(-2, 62, (2, 18, 20), generator=torch.Generator().manual_seed(15))
    values, indices = rerank_topk(q, k, w, cand, 10, 1.0, True, None, None, mask=mask)
    ref_values, _ = torch_impl.rerank_topk(q.double(), k.double(), w.double(), cand, 10, 1.0,
                                           True, None, None, mask, 0)
    scores = reference.dense_scores(q, k, w, 1.0, True, mask=mask)
    finite = torch.isfinite(values)
    assert torch.equal(finite.sum(-1), torch.isfinite(ref_values).sum(-1))
    torch.testing.assert_close(torch.where(finite, scores.gather(-1, indices), NEG_INF)
                               .sort(-1).values, ref_values.double().sort(-1).values,
                               rtol=2e-3, atol=2e-3)


@forms
def test_hisa_with_mask_keeps_the_reference_blocks(form):
    q, k, w = make(1, 16, 100, 4, seed=16)
    # Sparse: some blocks of 16 keys have no visible key, so the first/last visible block moves.
    mask = make_mask(form, 1, 16, 100, seed=17, keep=0.05)
    ours = hisa_candidates(q, k, w, 16, 3, True, None, None, mask=mask)
    ref = torch_impl.hisa_candidates(q.double(), k.double(), w.double(), 16, 3, True, None,
                                     None, mask, 0)
    assert ours.shape == ref.shape
    visible, _ = reference.reference_visibility(q, k, True, mask=mask)
    seen = block_visibility(visible, 16)
    # Kept blocks are distinct; the visible ones are the reference's (rows with fewer visible
    # blocks than kept fill the rest with arbitrary hidden blocks, as torch.topk does).
    for kept, ref_kept, row_seen in zip(ours[0, :, ::16] // 16, ref[0, :, ::16] // 16, seen[0]):
        assert kept.unique().numel() == kept.numel()
        assert set(kept[row_seen[kept]].tolist()) == set(ref_kept[row_seen[ref_kept]].tolist())
    assert (seen[0].sum(-1) < 3).any(), "the case must cover rows with few visible blocks"


def _window_mask(queries, keys, window):
    """Each query sees `window` keys ending at its causal position: rows with fewer visible keys
    than k_top, on the sampled path (300 keys)."""
    pos = torch.arange(keys)
    last = keys - queries + torch.arange(queries)
    return (pos <= last[:, None]) & (pos > last[:, None] - window)


@pytest.mark.parametrize("variant", ["dense", "misa", "misa_hier", "hisa"])
def test_cuda_op_implementations_with_a_mask_end_to_end(variant):
    # The functions register.py registers for CUDA, called on CPU tensors under the interpreter.
    q, k, w = make(1, 16, 300, 4, seed=18)
    mask = _window_mask(16, 300, 12)[None].expand(1, 16, 300)
    additive = torch.zeros(16, 300, dtype=torch.float16).masked_fill(~mask[0], NEG_INF)
    for m in (mask, additive):
        vis = (False, None, None, m, 0)
        if variant == "dense":
            values, indices = register.CUDA_IMPLEMENTATIONS["dense_topk"](q, k, w, 20, 1.0, *vis)
            ref_v, _ = reference.dense_topk(q, k, w, 20, 1.0, False, mask=m)
        elif variant == "hisa":
            cand = register.CUDA_IMPLEMENTATIONS["hisa_candidates"](q, k, w, 16, 4, *vis)
            values, indices = register.CUDA_IMPLEMENTATIONS["rerank_topk"](q, k, w, cand, 20, 1.0, *vis)
            ref_v, _ = reference.hisa_topk(q, k, w, 20, 16, 4, 1.0, False, mask=m)
        else:
            heads = register.CUDA_IMPLEMENTATIONS["route_heads"](q, k, w, 2, 32, "score", *vis)
            r = reference.router_scores(q, k, w, 32, False, mask=m)
            # Router scores tie at 0 (ReLU): compare the scores of the chosen heads, then
            # follow our heads in the reference.
            assert torch.equal(r.gather(-1, heads).sort(-1).values,
                               r.topk(2, dim=-1).values.sort(-1).values)
            routed = reference.routed_scores(q, k, w, heads, 1.0, False, mask=m)
            if variant == "misa":
                values, indices = register.CUDA_IMPLEMENTATIONS["routed_topk"](q, k, w, heads, 20, 1.0, *vis)
                ref_v = routed.topk(20, dim=-1).values
            else:
                _, cand = register.CUDA_IMPLEMENTATIONS["routed_topk"](q, k, w, heads, 40, 1.0, *vis)
                values, indices = register.CUDA_IMPLEMENTATIONS["rerank_topk"](q, k, w, cand, 20, 1.0, *vis)
                allowed = torch.zeros_like(routed, dtype=torch.bool).scatter_(
                    -1, routed.topk(40, dim=-1).indices, True)
                ref_v = reference.dense_scores(q, k, w, 1.0, False, mask=m).masked_fill(
                    ~allowed, NEG_INF).topk(20, dim=-1).values
        scores = (routed if variant == "misa"
                  else reference.dense_scores(q, k, w, 1.0, False, mask=m))
        finite = torch.isfinite(values)
        assert torch.equal(finite.sum(-1), torch.isfinite(ref_v).sum(-1))
        torch.testing.assert_close(torch.where(finite, scores.gather(-1, indices), NEG_INF)
                                   .sort(-1).values, ref_v.sort(-1).values, rtol=2e-3,
                                   atol=2e-3)
        # No key twice; with distinct candidates, -inf slots included (hidden keys). HISA's
        # candidates past T are -1, which the re-rank (torch's too) reports as key 0.
        rows = indices.view(-1, 20)
        if variant == "hisa":
            rows = [row[finite_row] for row, finite_row in zip(rows, finite.view(-1, 20))]
        assert all(row.unique().numel() == row.numel() for row in rows)


def test_masked_selection_gives_hidden_ids_to_its_empty_slots():
    # 12 visible keys of 300 for k=20, sampled path: the 8 -inf slots get hidden keys, so that a
    # re-rank of the list never scores a visible key twice.
    q, k, w = make(1, 16, 300, 4, seed=19)
    mask = _window_mask(16, 300, 12)
    values, indices = scored_topk(q, k, w, 20, 1.0, False, None, None, mask=mask)
    assert (torch.isfinite(values).sum(-1) == 12).all()
    hidden = ~mask.expand(1, 16, 300).gather(-1, indices)
    assert torch.equal(hidden, ~torch.isfinite(values))
    assert all(row.unique().numel() == 20 for row in indices.view(-1, 20))


def test_cuda_fallback_warns_once_per_reason(monkeypatch):
    monkeypatch.setattr(register, "_WARNED", set())
    q, k, w = make(1, 4, 20, 4, seed=20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            heads = register.CUDA_IMPLEMENTATIONS["route_heads"](q, k, w, 2, 8, "qnorm", True, None, None, None, 0)
            register.CUDA_IMPLEMENTATIONS["route_heads"](q, k, w, 2, 8, "score", True, None, None, None, 0)
    messages = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
    assert len(messages) == 1 and "qnorm" in messages[0], messages
    assert torch.equal(heads, torch_impl.route_heads(q, k, w, 2, 8, "qnorm", True, None, None,
                                                     None, 0))


@pytest.mark.parametrize("layout", ["1st", "st", "expand", "b1t"])
def test_ops_take_broadcastable_masks_on_cpu(layout):
    q, k, w = make(2, 5, 9, 3, seed=21)
    full = torch.rand(1, 5, 9, generator=torch.Generator().manual_seed(22)) < 0.6
    mask = {"1st": full, "st": full[0], "expand": full.expand(2, 5, 9),
            "b1t": full[:, :1].expand(2, 1, 9)}[layout]
    expanded = mask.expand(2, 5, 9).clone()
    ops = torch.ops.misa
    for op, args in ((ops.dense_topk, (4,)), (ops.routed_topk, (routed_heads(2, 5, 3, 2, 1), 4))):
        got = op(q, k, w, *args, causal=False, mask=mask)
        want = op(q, k, w, *args, causal=False, mask=expanded)
        assert torch.equal(got[0], want[0])
    assert torch.equal(ops.route_heads(q, k, w, 2, 4, causal=False, mask=mask),
                       ops.route_heads(q, k, w, 2, 4, causal=False, mask=expanded))
    assert torch.equal(ops.hisa_candidates(q, k, w, 4, 2, causal=False, mask=mask),
                       ops.hisa_candidates(q, k, w, 4, 2, causal=False, mask=expanded))
    scores = reference.dense_scores(q, k, w, 1.0, False, mask=mask)
    assert torch.equal(torch.isfinite(scores), expanded & True)


@pytest.mark.parametrize("shape", [(2, 5, 1, 9), (3, 5, 9), (5, 8), (2, 2, 5, 9)])
def test_non_broadcastable_masks_are_refused_with_the_shape_found(shape):
    q, k, w = make(2, 5, 9, 3)
    with pytest.raises(ValueError, match=r"mask has shape \(" + ", ".join(map(str, shape))
                       + r"\), expected \[B, S, T\] = \[2, 5, 9\] or a shape that broadcasts"):
        torch.ops.misa.dense_topk(q, k, w, 4, causal=False, mask=torch.ones(shape,
                                                                            dtype=torch.bool))


def test_opcheck_with_a_broadcast_mask():
    q, k, w = make(2, 5, 9, 3)
    mask = torch.rand(5, 9, generator=torch.Generator().manual_seed(23)) < 0.7
    torch.library.opcheck(torch.ops.misa.dense_topk.default, (q, k, w, 4),
                          dict(causal=False, mask=mask))
    torch.library.opcheck(torch.ops.misa.route_heads.default, (q, k, w, 2),
                          dict(block_size=4, causal=False, mask=mask[None]))


@pytest.mark.parametrize("additive", [False, True], ids=["bool", "additive"])
def test_rows_redone_on_the_device_keep_their_mask(additive, monkeypatch):
    # Every key equal: each row's scores tie, the candidate lists overflow, and the flagged rows
    # are rescored and selected on the device, which must apply those rows' mask.
    q, k, w = make(1, 16, 300, 4, seed=24)
    k[:] = k[0, :1]
    # More visible keys (about 290) than a candidate list holds (256).
    assert plan_selection(10, 300).capacity < 280
    mask = make_mask(MASK_FORMS[0], 1, 16, 300, seed=25, keep=0.97)
    if additive:
        # 0 / -inf only: visible scores stay tied.
        mask = torch.zeros(mask.shape).masked_fill(~mask, NEG_INF)
    flagged = []
    original = scored_topk_module.rescore_flagged_rows

    def spy(q, k, w, flags, *args, **kwargs):
        flagged.append(int(flags.sum()))
        return original(q, k, w, flags, *args, **kwargs)
    monkeypatch.setattr(scored_topk_module, "rescore_flagged_rows", spy)
    values, indices = scored_topk(q, k, w, 10, 1.0, True, None, None, mask=mask)
    assert sum(flagged) > 0
    scores = reference.dense_scores(q, k, w, mask=mask)
    assert_same_selection(values, indices, scores, 10)
    assert torch.isfinite(scores.gather(-1, indices)[torch.isfinite(values)]).all()


@pytest.mark.parametrize("block", [5, 16, 40])
@pytest.mark.parametrize("causal,ragged", [(True, False), (False, True), (True, True)])
@forms
def test_block_visibility_kernel_matches_the_reference(form, block, causal, ragged):
    """The router's per-block visibility: whole chunks, a block's ragged end (40 = 2 chunks of 16
    + 8) and blocks narrower than a chunk (5), under causal and ragged ranges."""
    from misa_compile.kernels.triton.scoring.block_visibility import block_visibility as kernel
    from misa_compile.kernels.visibility import chunk_visibility

    batch, queries, keys = 2, 21, 93
    mask = make_mask(form, batch, queries, keys, seed=block)
    gen = torch.Generator().manual_seed(block)
    key_start = torch.randint(0, 30, (batch, queries), generator=gen) if ragged else None
    key_end = key_start + torch.randint(0, 80, (batch, queries), generator=gen) if ragged else None
    got = kernel(mask, batch, queries, keys, block, causal, key_start, key_end)
    visible, _ = chunk_visibility(slice(None), batch, queries, keys, torch.device("cpu"), causal,
                                  key_start, key_end, mask)
    want = block_visibility(visible, block)
    assert want.any() and not want.all(), "the case must have visible and hidden blocks"
    assert got.dtype == torch.uint8 and torch.equal(got.bool(), want)
