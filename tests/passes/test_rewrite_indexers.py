"""The rewrite: proven sites become the misa op chain of the configured variant and the rewritten
graph selects what the dense indexer selects (active heads = all heads); refused sites and graphs
without indexers are left exactly as they were.

Selections are compared by gathered dense scores and sets of visible keys, never by index order."""
from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

from misa_compile.config import MisaConfig
from misa_compile.kernels import indexer_topk
from misa_compile.passes import reasons
from misa_compile.passes.rewrite_indexers import rewrite_indexer_sites

from .test_find_indexers import (
    B, H, K, S, SCALE, T, _scores_returned, aten_graph, bmm_where_tril, bmm_where_tril_scores,
    einsum_masked_fill, einsum_masked_fill_scores, exported_graph, flat_inputs, flat_mul_sum,
    flat_mul_sum_scores, hf_matmul_weights, hf_matmul_weights_scores, inputs,
    maximum_softmax_weights_alibi, maximum_softmax_weights_alibi_scores, where_hidden_first,
    where_hidden_first_scores, AsModule)

MISA = torch.ops.misa
ALL_HEADS = MisaConfig(variant="misa", active_heads=H, block_size=2)


def compile_with_rewrite(fn, args, config, zero_dim_inputs_are_python_scalars=False):
    """Runs fn(*args) compiled by AOTAutograd with the rewrite applied to its ATen graph:
    (outputs, report, rewritten graph module). Dynamo orders graph inputs by first use, so the
    graph is run through the compiled function rather than called directly."""
    seen = []

    def rewrite(gm, _example_inputs):
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        positions = [i for i, n in enumerate(placeholders)
                     if zero_dim_inputs_are_python_scalars and n.meta["val"].dim() == 0]
        seen.append((rewrite_indexer_sites(gm, config, python_scalar_inputs=positions), gm))
        return make_boxed_func(gm.forward)

    compiled = torch.compile(fn, backend=aot_autograd(fw_compiler=rewrite), fullgraph=True)
    with torch.no_grad():
        outputs = compiled(*args)
    (report, gm), = seen
    return outputs, report, gm


def misa_ops(gm) -> list:
    return [n.target for n in gm.graph.nodes
            if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "misa"]


def has_topk(gm) -> bool:
    return any(n.target == torch.ops.aten.topk.default for n in gm.graph.nodes)


def check_selection(indices, dense, values=None) -> None:
    """`indices` pick, per query, min(K, visible) distinct visible keys holding the K largest
    dense scores; `values` (if given) are those scores. Hidden keys are -inf or finfo.min-ish."""
    dense = dense.double()
    visible = dense > -1e30
    expect = visible.sum(-1).clamp(max=K)
    slots = torch.arange(K) < expect[..., None]
    ranked = dense.masked_fill(~visible, float("-inf")).sort(-1, descending=True).values[..., :K]
    member = torch.zeros_like(visible).scatter(-1, indices.long(), True) & visible
    assert torch.equal(member.sum(-1), expect), "not min(K, visible) distinct visible keys"
    gathered = dense.gather(-1, indices.long()).sort(-1, descending=True).values
    torch.testing.assert_close(gathered[slots], ranked[slots], rtol=1e-5, atol=1e-5)
    if values is not None:
        got = values.double().sort(-1, descending=True).values
        torch.testing.assert_close(got[slots], ranked[slots], rtol=1e-2, atol=1e-2)


SPELLINGS = {
    "einsum_masked_fill": (einsum_masked_fill, einsum_masked_fill_scores, lambda a: a[:4]),
    "hf_matmul_weights": (hf_matmul_weights, hf_matmul_weights_scores,
                          lambda a: a[:3] + (a[4],)),
    "bmm_where_tril": (bmm_where_tril, bmm_where_tril_scores, lambda a: a[:3]),
    "where_hidden_first": (where_hidden_first, where_hidden_first_scores, lambda a: a[:4]),
    "maximum_softmax_weights_alibi": (maximum_softmax_weights_alibi,
                                      maximum_softmax_weights_alibi_scores, lambda a: a[:4]),
}


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_rewritten_graph_selects_the_dense_top_k(name):
    fn, scores_fn, pick = SPELLINGS[name]
    args = pick(inputs())
    indices, report, gm = compile_with_rewrite(fn, args, ALL_HEADS)
    assert [(r.heads, r.k_top, r.variant) for r in report.rewritten] == [(H, K, "misa")]
    assert not has_topk(gm) and misa_ops(gm) == [MISA.route_heads.default,
                                                  MISA.routed_topk.default]
    assert indices.dtype == torch.int64 and indices.shape == (B, S, K)
    check_selection(indices, scores_fn(*args))


def test_flat_layout_keeps_the_values_dtype_and_returns_int64_indices():
    q, k, w = (t.to(torch.bfloat16) for t in flat_inputs())
    (values, indices), report, _ = compile_with_rewrite(flat_mul_sum, (q, k, w), ALL_HEADS)
    assert report.rewritten[0].layout == "flat"
    eager_values, eager_indices = flat_mul_sum(q, k, w)
    assert values.dtype == eager_values.dtype == torch.bfloat16
    assert indices.dtype == eager_indices.dtype == torch.int64
    assert values.shape == eager_values.shape == (S, K)
    check_selection(indices[None], flat_mul_sum_scores(q.float(), k.float(), w.float())[None],
                    values[None])


@pytest.mark.parametrize("variant,chain", [
    ("dense", [MISA.dense_topk.default]),
    ("misa", [MISA.route_heads.default, MISA.routed_topk.default]),
    ("misa_hier", [MISA.route_heads.default, MISA.routed_topk.default, MISA.rerank_topk.default]),
    ("hisa", [MISA.hisa_candidates.default, MISA.rerank_topk.default]),
])
def test_each_variant_emits_the_chain_indexer_topk_builds(variant, chain):
    q, k, w, visible, _ = inputs()
    config = MisaConfig(variant=variant, active_heads=2, block_size=2, candidates=4,
                        hisa_block=2, hisa_blocks=2)
    indices, report, gm = compile_with_rewrite(einsum_masked_fill, (q, k, w, visible), config)
    assert report.rewritten[0].variant == variant
    assert misa_ops(gm) == chain
    _, expected = indexer_topk(q, k, w, K, config, scale=SCALE, causal=False,
                               mask=visible.expand(B, S, T))
    assert torch.equal(indices.sort(-1).values, expected.sort(-1).values)


def test_static_contexts_below_min_keys_run_dense():
    q, k, w, visible, _ = inputs()
    gm = aten_graph(einsum_masked_fill, q, k, w, visible)
    record = rewrite_indexer_sites(gm, MisaConfig(active_heads=2, min_keys=T + 1)).rewritten[0]
    assert record.variant == "dense" and "min_keys" in record.detail
    assert misa_ops(gm) == [MISA.dense_topk.default]


def test_scores_with_another_user_are_refused_and_the_graph_is_untouched():
    q, k, w, visible, _ = inputs()
    before = aten_graph(_scores_returned, q, k, w, visible).code
    (indices, scores), report, gm = compile_with_rewrite(_scores_returned, (q, k, w, visible),
                                                         ALL_HEADS)
    assert [r.reason for r in report.refused] == [reasons.SCORES_USED_ELSEWHERE]
    assert gm.code == before and has_topk(gm)
    eager_indices, eager_scores = _scores_returned(q, k, w, visible)
    assert torch.equal(indices, eager_indices) and torch.equal(scores, eager_scores)


def test_active_heads_above_the_sites_heads_is_refused_as_config_mismatch():
    q, k, w, visible, _ = inputs()
    gm = aten_graph(einsum_masked_fill, q, k, w, visible)
    before = gm.code
    report = rewrite_indexer_sites(gm, MisaConfig(active_heads=H + 1))
    (record,) = report.refused
    assert record.reason == reasons.CONFIG_MISMATCH and str(H) in record.detail
    assert record.heads == H and gm.code == before


def test_a_graph_without_indexers_is_untouched():
    def no_indexer(x, y):
        return torch.relu(x @ y).topk(2).indices, (x * 2).sum(-1)

    gm = aten_graph(no_indexer, torch.randn(4, 5), torch.randn(5, 6))
    before = gm.code
    assert len(rewrite_indexer_sites(gm, ALL_HEADS)) == 0
    assert gm.code == before


def test_exported_program_is_rewritten_through_transform_do_not_use():
    from torch.fx.passes.infra.pass_base import PassResult

    q, k, w, visible, _ = inputs()
    program = torch.export.export(AsModule(einsum_masked_fill),
                                  (q, k, w, visible)).run_decompositions()
    reports = []

    def rewrite(graph_module):
        reports.append(rewrite_indexer_sites(graph_module, ALL_HEADS))
        return PassResult(graph_module, True)

    program = program._transform_do_not_use(rewrite)
    assert len(reports[0].rewritten) == 1
    assert not has_topk(program.graph_module)
    check_selection(program.module()(q, k, w, visible),
                    einsum_masked_fill_scores(q, k, w, visible))


def _scaled_by_input(q, k, w, visible, c):
    scores = (torch.einsum("bshd,btd->bsht", q, k) * c).relu()
    index = torch.einsum("bsht,bsh->bst", scores, w)
    return index.masked_fill(~visible, float("-inf")).topk(K).indices


@pytest.mark.parametrize("c", [0.3, -0.3])
def test_a_run_time_python_scalar_before_relu_is_folded_exactly_for_either_sign(c):
    q, k, w, visible, _ = inputs()
    args = (q, k, w, visible, torch.tensor(c))
    _, refused, _ = compile_with_rewrite(_scaled_by_input, args, ALL_HEADS)
    assert [r.reason for r in refused.refused] == [reasons.UNKNOWN_SCALE]
    torch._dynamo.reset()
    # As the backend marks Dynamo's unspecialised Python floats.
    indices, report, _ = compile_with_rewrite(_scaled_by_input, args, ALL_HEADS,
                                              zero_dim_inputs_are_python_scalars=True)
    assert len(report.rewritten) == 1, str(report)
    dense = torch.einsum("bsht,bsh->bst", (torch.einsum("bshd,btd->bsht", q, k) * c).relu(), w)
    check_selection(indices, dense.masked_fill(~visible, float("-inf")))


def test_export_graph_spelling_matches_the_dynamo_one():
    # The same math captured by both front ends gives the same site.
    q, k, w, visible, _ = inputs()
    dynamo = rewrite_indexer_sites(aten_graph(einsum_masked_fill, q, k, w, visible), ALL_HEADS)
    export = rewrite_indexer_sites(exported_graph(einsum_masked_fill, q, k, w, visible),
                                   ALL_HEADS)
    fields = lambda r: (r.heads, r.k_top, r.layout, r.dtype, r.mask, r.variant)  # noqa: E731
    assert [fields(r) for r in dynamo.rewritten] == [fields(r) for r in export.rewritten]


def _negated_weights(q, k, w, visible):
    scores = torch.einsum("bshd,btd->bsht", q, k).relu()
    index = (scores * (w * -H ** -0.5)[..., None]).sum(2)
    return index.masked_fill(~visible, float("-inf"))


def test_a_negative_constant_on_the_weights_is_part_of_the_signed_weights():
    q, k, w, visible, _ = inputs()
    indices, report, _ = compile_with_rewrite(lambda *a: _negated_weights(*a).topk(K).indices,
                                              (q, k, w, visible), ALL_HEADS)
    assert len(report.rewritten) == 1, str(report)
    check_selection(indices, _negated_weights(q, k, w, visible))


def _widened_then_scored(q, k, w, round_to=None):
    """DeepSeek-V3.2's spelling: 16-bit q and k widened to fp32 right before the contraction
    (optionally rounded to `round_to` first, which the op must then see)."""
    if round_to is not None:
        q, k = q.float().to(round_to), k.float().to(round_to)
    scores = torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)).relu()
    index = torch.matmul(w.float().unsqueeze(-2), scores).squeeze(-2)
    return index.topk(K, dim=-1).indices


@pytest.mark.parametrize("dtype,round_to", [(torch.bfloat16, None), (torch.float16, None),
                                            (torch.bfloat16, torch.float16)])
def test_widened_16_bit_operands_reach_the_op_narrow_with_the_same_selection(dtype, round_to):
    """The ops widen q and k to fp32 themselves, exactly, so a model's q.float() is left out
    and the kernels' dots run on 16-bit operands; a rounding cast below it is kept."""
    q, k, w, _, _ = inputs()
    q, k = q.to(dtype), k.to(dtype)
    fn = functools.partial(_widened_then_scored, round_to=round_to)
    indices, report, gm = compile_with_rewrite(fn, (q, k, w), MisaConfig(variant="dense"))
    assert len(report.rewritten) == 1
    dense_call, = [n for n in gm.graph.nodes if n.target == MISA.dense_topk.default]
    operand_dtypes = [n.meta["val"].dtype for n in dense_call.args[:2]]
    assert operand_dtypes == [round_to or dtype] * 2
    if round_to is not None:
        q, k = q.to(round_to), k.to(round_to)
    per_head = torch.einsum("bshd,btd->bsht", q.float(), k.float()).relu()
    check_selection(indices, (per_head * w[..., None]).sum(2))
