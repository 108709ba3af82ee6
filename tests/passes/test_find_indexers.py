"""The indexer matcher on hand-written spellings of the DSA indexer, captured as ATen graphs by
AOTAutograd (static and dynamic shapes) and by torch.export(...).run_decompositions(); each
near-miss is refused with its reason code; top-ks that are not indexers are not reported."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

from misa_compile import MisaConfig
from misa_compile.backend import python_scalar_inputs
from misa_compile.passes import reasons
from misa_compile.passes.axis_labels import LabelSpace, LayoutError
from misa_compile.passes.find_indexers import IndexerSite, SiteRefusal, find_indexer_sites
from misa_compile.passes.rewrite_indexers import rewrite_indexer_sites

# Distinct sizes, so that no proof can pass by confusing two axes of equal length.
B, S, H, D, T, K = 2, 5, 4, 8, 7, 3
SCALE = D ** -0.5


# --- spellings --------------------------------------------------------------------------------

def einsum_masked_fill_scores(q, k, w, visible):
    """The DeepSeek reference code's shape: einsum, ReLU, scale after ReLU, masked_fill."""
    scores = torch.einsum("bshd,btd->bsht", q, k).relu() * SCALE
    index = torch.einsum("bsht,bsh->bst", scores, w)
    return index.masked_fill(~visible, float("-inf"))


def einsum_masked_fill(q, k, w, visible):
    return einsum_masked_fill_scores(q, k, w, visible).topk(K, dim=-1).indices


def hf_matmul_weights_scores(q, k, w, bias):
    """Hugging Face DeepSeek-V3.2: float casts, scale before ReLU, weights * H^-0.5 reduced by a
    second matmul, additive finfo.min mask."""
    scores = torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * SCALE
    scores = torch.nn.functional.relu(scores)
    weights = w.float() * H ** -0.5
    return torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2) + bias


def hf_matmul_weights(q, k, w, bias):
    return hf_matmul_weights_scores(q, k, w, bias).topk(K, dim=-1).indices


def flat_mul_sum_scores(q, k, w):
    """Token-major q [N,H,D], k [T,D], w [N,H]; heads summed by mul + sum; no mask; values
    and indices both used."""
    scores = torch.einsum("nhd,td->nht", q, k).clamp_min(0.0)
    return (scores * w[..., None]).sum(1)


def flat_mul_sum(q, k, w):
    values, indices = flat_mul_sum_scores(q, k, w).topk(K)
    return values, indices


def bmm_where_tril_scores(q, k, w):
    """bmm over flattened (batch, query) rows, mask built in the graph from arange, applied with
    where(visible, x, -inf); scale by division before ReLU."""
    keys = k[:, None].expand(B, S, T, D).reshape(B * S, T, D)
    logits = torch.bmm(q.reshape(B * S, H, D), keys.transpose(1, 2))
    scores = (logits.view(B, S, H, T) / D ** 0.5).relu()
    index = (scores * w.unsqueeze(-1)).sum(dim=2)
    positions = torch.arange(T)
    visible = positions[None, :] <= torch.arange(S)[:, None] + (T - S)
    return torch.where(visible, index, float("-inf"))


def bmm_where_tril(q, k, w):
    return bmm_where_tril_scores(q, k, w).topk(K).indices


def where_hidden_first_scores(q, k, w, visible):
    """where(hidden, -inf, x): the condition marks the hidden keys."""
    scores = torch.einsum("bshd,btd->bsht", q, k).relu()
    index = torch.einsum("bsht,bsh->bst", scores, w)
    return torch.where(~visible, float("-inf"), index)


def where_hidden_first(q, k, w, visible):
    return where_hidden_first_scores(q, k, w, visible).topk(K).indices


def maximum_softmax_weights_alibi_scores(q, k, w, visible):
    """ReLU as maximum(x, zeros_like(x)), weights through a softmax (itself an activation of a
    contraction in real models), an ALiBi-like bias subtracted, where with full_like(-inf)."""
    logits = torch.einsum("bshd,btd->bsht", q, k)
    scores = torch.maximum(logits, torch.zeros_like(logits))
    index = torch.einsum("bsht,bsh->bst", scores, (w @ torch.eye(H)).softmax(-1))
    distance = (torch.arange(S)[:, None] + (T - S) - torch.arange(T)[None, :]).float()
    index = index - 0.1 * distance
    return torch.where(visible, index, torch.full_like(index, float("-inf")))


def maximum_softmax_weights_alibi(q, k, w, visible):
    return maximum_softmax_weights_alibi_scores(q, k, w, visible).topk(K).indices


def inputs(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, D, generator=g).to(dtype)
    k = torch.randn(B, T, D, generator=g).to(dtype)
    w = torch.randn(B, S, H, generator=g).to(dtype)
    visible = torch.ones(S, T, dtype=torch.bool).tril(T - S)
    bias = torch.zeros(S, T).masked_fill(~visible, torch.finfo(torch.float32).min)
    return q, k, w, visible, bias


def flat_inputs(seed: int = 0):
    q, k, w, _, _ = inputs(seed)
    return q[0], k[0], w[0]


def aten_graph(fn, *args, dynamic: bool = False) -> torch.fx.GraphModule:
    """The ATen graph AOTAutograd hands to a backend for fn(*args). Its `python_scalars` lists
    the placeholders that carry Python floats (Dynamo passes them as 0-d tensors under dynamic
    shapes)."""
    graphs = []

    def capture(gm, _example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def backend(dynamo_gm, example_inputs):
        graphs.append(python_scalar_inputs(dynamo_gm))
        return aot_autograd(fw_compiler=capture)(dynamo_gm, example_inputs)

    compiled = torch.compile(fn, backend=backend, dynamic=dynamic, fullgraph=True)
    with torch.no_grad():
        compiled(*args)
    assert len(graphs) == 2
    positions, gm = graphs
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    gm.python_scalars = [placeholders[i] for i in positions]
    return gm


class AsModule(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def exported_graph(fn, *args) -> torch.fx.GraphModule:
    program = torch.export.export(AsModule(fn), args).run_decompositions()
    return program.graph_module


def only_match(gm):
    matches = find_indexer_sites(gm, getattr(gm, "python_scalars", ()))
    assert len(matches) == 1, matches
    return matches[0]


def only_site(gm) -> IndexerSite:
    site = only_match(gm)
    assert isinstance(site, IndexerSite), f"refused: {site.reason}: {site.detail}"
    return site


# --- sites that must be found -------------------------------------------------------------

def test_einsum_with_masked_fill_is_found():
    q, k, w, visible, _ = inputs()
    gm = aten_graph(einsum_masked_fill, q, k, w, visible)
    site = only_site(gm)
    assert (site.heads, site.k_top, site.layout, site.mask_kind) == (H, K, "batch", "bool")
    assert site.scale == pytest.approx(SCALE)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert site.q.source.node is placeholders[0] and site.k.source.node is placeholders[1]
    # masked_fill(~visible): the hidden-keys condition is traced back to `visible` itself.
    (mask,) = site.masks
    assert mask.invert and mask.operand.pick(site.space, negated=True).node is placeholders[3]


def test_hugging_face_matmul_weights_with_additive_mask_is_found():
    q, k, w, _, bias = inputs()
    site = only_site(aten_graph(hf_matmul_weights, q, k, w, bias))
    assert (site.heads, site.k_top, site.layout, site.mask_kind) == (H, K, "batch", "additive")
    # softmax_scale before the ReLU; H^-0.5 stays with the (signed) weights.
    assert site.scale == pytest.approx(SCALE)
    assert len(site.weights) == 1 and site.weights[0].source.node.target == torch.ops.aten.mul.Tensor


def test_flat_layout_with_mul_sum_and_clamp_min_is_found():
    site = only_site(aten_graph(flat_mul_sum, *flat_inputs()))
    assert (site.heads, site.k_top, site.layout, site.mask_kind) == (H, K, "flat", "none")
    assert site.batch is None and site.scale == pytest.approx(1.0)


def test_bmm_over_merged_rows_with_in_graph_tril_mask_is_found():
    q, k, w, _, _ = inputs()
    site = only_site(aten_graph(bmm_where_tril, q, k, w))
    assert (site.heads, site.k_top, site.mask_kind) == (H, K, "bool")
    assert site.scale == pytest.approx(SCALE)
    # The key was broadcast to every query row; the proof still sees one key per batch.
    assert site.space.size(site.key) == T


def test_where_with_the_fill_first_marks_hidden_keys():
    q, k, w, visible, _ = inputs()
    site = only_site(aten_graph(where_hidden_first, q, k, w, visible))
    assert site.mask_kind == "bool" and site.masks[0].invert


def test_maximum_relu_softmax_weights_subtracted_bias_and_full_like_fill_are_found():
    q, k, w, visible, _ = inputs()
    site = only_site(aten_graph(maximum_softmax_weights_alibi, q, k, w, visible))
    assert (site.heads, site.k_top, site.mask_kind) == (H, K, "additive+bool")
    (bias,) = [m for m in site.masks if m.kind == "additive"]
    assert bias.factor == -1.0


def test_dynamic_shapes_are_proven_from_symbolic_sizes():
    q, k, w, visible, _ = inputs()
    gm = aten_graph(einsum_masked_fill, q, k, w, visible, dynamic=True)
    site = only_site(gm)
    assert isinstance(site.keys, torch.SymInt)
    assert (site.heads, site.k_top, site.mask_kind) == (H, K, "bool")
    # Under dynamic shapes Dynamo passes the float SCALE as a graph input: its sign is known only
    # at run time, so it is kept as a run-time factor (folded exactly by the rewrite).
    (factor, where), = site.runtime_factors
    assert where == "above" and factor is not None and site.scale == pytest.approx(1.0)


def test_a_tensor_factor_of_unknown_sign_is_refused_even_under_dynamic_shapes():
    q, k, w, visible, _ = inputs()
    refusal = only_match(aten_graph(_unknown_scale, q, k, w, visible, torch.tensor(0.7),
                                    dynamic=True))
    assert isinstance(refusal, SiteRefusal) and refusal.reason == reasons.UNKNOWN_SCALE


def test_bf16_graph_with_casts_is_found():
    q, k, w, _, bias = inputs(dtype=torch.bfloat16)
    site = only_site(aten_graph(hf_matmul_weights, q, k, w, bias))
    assert site.dtype == torch.float32 and site.heads == H


def test_graph_of_torch_export_after_run_decompositions_is_found():
    q, k, w, visible, _ = inputs()
    site = only_site(exported_graph(einsum_masked_fill, q, k, w, visible))
    assert (site.heads, site.k_top, site.layout, site.mask_kind) == (H, K, "batch", "bool")


def test_module_path_names_the_site():
    class Indexer(torch.nn.Module):
        def forward(self, q, k, w, visible):
            return einsum_masked_fill(q, k, w, visible)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Indexer()])

        def forward(self, q, k, w, visible):
            return self.layers[0](q, k, w, visible)

    site = only_site(aten_graph(Model(), *inputs()[:4]))
    assert site.name.startswith("layers.0:"), site.name


# --- near-misses: refused with their reason ----------------------------------------------

def _negative_scale(q, k, w, visible):
    scores = (torch.einsum("bshd,btd->bsht", q, k) * -SCALE).relu()
    return torch.einsum("bsht,bsh->bst", scores, w).topk(K).indices


def _unknown_scale(q, k, w, visible, temperature):
    scores = (torch.einsum("bshd,btd->bsht", q, k) * temperature).relu()
    return torch.einsum("bsht,bsh->bst", scores, w).topk(K).indices


def _gelu(q, k, w, visible):
    scores = torch.nn.functional.gelu(torch.einsum("bshd,btd->bsht", q, k))
    return torch.einsum("bsht,bsh->bst", scores, w).topk(K).indices


def _silu(q, k, w, visible):
    scores = torch.nn.functional.silu(torch.einsum("bshd,btd->bsht", q, k))
    return torch.einsum("bsht,bsh->bst", scores, w).topk(K).indices


def _per_head_keys(q, k, w, visible):
    keys = k[:, :, None, :] * torch.linspace(0.5, 1.5, H)[None, None, :, None]
    scores = torch.einsum("bshd,bthd->bsht", q, keys).relu()
    return torch.einsum("bsht,bsh->bst", scores, w).topk(K).indices


def _sum_over_queries(q, k, w, visible):
    scores = torch.einsum("bshd,btd->bsht", q, k).relu()
    return (scores * w[..., None]).sum(dim=1).topk(K).indices


def _topk_over_queries(q, k, w, visible):
    scores = torch.einsum("bshd,btd->bsht", q, k).relu()
    return torch.einsum("bsht,bsh->bst", scores, w).topk(K, dim=1).indices


def _smallest(q, k, w, visible):
    scores = torch.einsum("bshd,btd->bsht", q, k).relu()
    return torch.einsum("bsht,bsh->bst", scores, w).topk(K, largest=False).indices


def _mask_fills_zero(q, k, w, visible):
    scores = torch.einsum("bshd,btd->bsht", q, k).relu()
    index = torch.einsum("bsht,bsh->bst", scores, w)
    return index.masked_fill(~visible, 0.0).topk(K).indices


def _scores_returned(q, k, w, visible):
    scores = torch.einsum("bshd,btd->bsht", q, k).relu()
    index = torch.einsum("bsht,bsh->bst", scores, w)
    return index.topk(K).indices, index


def _exp_before_topk(q, k, w, visible):
    scores = torch.einsum("bshd,btd->bsht", q, k).relu()
    return torch.einsum("bsht,bsh->bst", scores, w).exp().topk(K).indices


NEAR_MISSES = [
    (_negative_scale, reasons.NEGATIVE_SCALE, ()),
    (_unknown_scale, reasons.UNKNOWN_SCALE, (torch.tensor(0.7),)),
    (_gelu, reasons.NOT_RELU, ()),
    (_silu, reasons.NOT_RELU, ()),
    (_per_head_keys, reasons.PER_HEAD_KEYS, ()),
    (_sum_over_queries, reasons.REDUCTION_NOT_OVER_HEADS, ()),
    (_topk_over_queries, reasons.TOPK_NOT_KEY_AXIS, ()),
    (_smallest, reasons.SMALLEST_TOPK, ()),
    (_mask_fills_zero, reasons.UNKNOWN_MASK, ()),
    (_scores_returned, reasons.SCORES_USED_ELSEWHERE, ()),
    (_exp_before_topk, reasons.UNSUPPORTED_LAYOUT, ()),
]


@pytest.mark.parametrize("fn,reason,extra", NEAR_MISSES, ids=[r for _, r, _ in NEAR_MISSES])
def test_near_miss_is_refused_with_its_reason(fn, reason, extra):
    q, k, w, visible, _ = inputs()
    refusal = only_match(aten_graph(fn, q, k, w, visible, *extra))
    assert isinstance(refusal, SiteRefusal), "a near-miss was proven"
    assert refusal.reason == reason, refusal.detail
    assert refusal.detail


def test_top_ks_that_are_not_indexers_are_not_reported():
    def router_and_sampling(x, gate, logits):
        experts = torch.softmax(x @ gate, dim=-1).topk(2).indices      # an MoE router
        tokens = (logits @ logits.T).topk(3).indices                     # one contraction only
        chained = torch.relu(x @ gate) @ gate.T                          # no shared-key form
        return experts, tokens, chained.topk(2).indices

    x, gate = torch.randn(6, 8), torch.randn(8, 4)
    assert find_indexer_sites(aten_graph(router_and_sampling, x, gate, torch.randn(5, 6))) == []


# --- the axis labels the proofs rest on ----------------------------------------------------

def test_reshape_labels_group_and_split_axes():
    space = LabelSpace()
    b, s, h = space.new(2), space.new(3), space.new(4)
    # [b*s, h] seen from its input [b, s, h]: the merged axis splits into b and s.
    merged = space.new(6)
    below = space.through_reshape([(merged,), (h,)], (2, 3, 4))
    assert [space.resolve(g[0]) for g in below[:2]] == [space.resolve(merged)[:1],
                                                        space.resolve(merged)[1:]]
    assert below[2] == (h,)
    # [b, s, h] seen from its input [b*s, 1, h]: labels group, the unit axis has none.
    assert space.through_reshape([(b,), (s,), (h,)], (6, 1, 4)) == [(b, s), (), (h,)]


def test_reshape_that_mixes_axes_is_rejected():
    space = LabelSpace()
    a, b = space.new(6), space.new(4)
    with pytest.raises(LayoutError):
        space.through_reshape([(a,), (b,)], (4, 6))


def bf16_scores_cast_back(q, k, w):
    # bf16 inputs, scores upcast to fp32 and back: torch.export adds metadata assertions on the
    # intermediate casts, which read the scores without using their values. The index score is
    # rounded to bf16 (order-preserving); rounding the per-head score instead is rounding_cast.
    logits = torch.einsum("bshd,btd->bsht", q.float(), k.float()).relu()
    scores = (logits * w[..., None]).sum(2).to(torch.bfloat16)
    return scores.float().topk(K, dim=-1).indices


def test_exported_metadata_assertions_on_the_scores_do_not_block_the_rewrite():
    q, k, w, _, _ = inputs()
    q, k, w = q.bfloat16(), k.bfloat16(), w.bfloat16()
    program = torch.export.export(AsModule(bf16_scores_cast_back), (q, k, w)).run_decompositions()
    checks = [n for n in program.graph.nodes
              if n.target is torch.ops.aten._assert_tensor_metadata.default]
    assert checks, "this torch.export no longer adds metadata assertions: the test needs another"
    report = rewrite_indexer_sites(program.graph_module, MisaConfig(variant="dense"))
    assert [r.status for r in report.sites] == ["rewritten"], str(report)
    selected = program.module()(q, k, w)
    expected = bf16_scores_cast_back(q, k, w)
    assert [set(r.tolist()) for r in selected.flatten(0, 1)] == \
        [set(r.tolist()) for r in expected.flatten(0, 1)]
