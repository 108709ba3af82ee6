"""The detector and rewrite against DSA indexers written in many spellings (tests/passes/
indexer_zoo.py), planted in host models with unrelated matmuls and top-ks, and against near-misses
that must be left alone.

Selections are compared by sets of visible keys and by gathered float64 reference scores
(kernels/reference.py), never by index order: ties are unspecified."""
from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
import torch._dynamo
from hypothesis import assume, example, given
from hypothesis import strategies as st

import misa_compile
from misa_compile.kernels import reference
from misa_compile.models import DeepSeekReferenceBlock, PackedSparseAttentionBlock

from .indexer_zoo import (AXES, HostSpec, IndexerSpec, axis_sweep_hosts, build_host, host_specs,
                          make_inputs, near_miss_hosts, positive_specs, program_settings, seeds,
                          single_site_host, split_outputs)

QUERIES, KEYS = 12, 16
# Looser where the eager model itself rounds the scores to 16 bits before ranking them.
REL_TOL = {"fp32": 1e-4, "bf16_upcast": 1e-4, "fp16_upcast": 1e-4, "bf16_mixed": 2e-2,
           "bf16": 2e-2}



def misa_options(heads: int, target: str = "aot_eager", **fields) -> dict:
    return dict(dict(variant="misa", active_heads=heads, block_size=4, target=target), **fields)


def run_profiled(fn, *args):
    """fn(*args) and how many times each misa op ran inside it (compiled code included)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn(*args)
    calls = collections.Counter(e.name for e in prof.events() if e.name.startswith("misa::"))
    return out, calls


def compile_and_run(model, inputs, options, dynamic=False, second_inputs=None):
    """Compiled outputs on `inputs` (and on `second_inputs`, other sizes, under dynamic shapes)
    with the misa op calls of the last run."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="misa", options=options, dynamic=dynamic,
                             fullgraph=True)
    with torch.no_grad():
        compiled(*inputs)  # compiles; the profiled second call then sees only compiled code
        outputs, calls = run_profiled(compiled, *inputs)
        second = compiled(*second_inputs) if second_inputs is not None else None
    return outputs, calls, second


def as_batch(t: torch.Tensor, rank: int = 3) -> torch.Tensor:
    return t if t.dim() == rank else t[None]


def check_site_selection(site, hx, hctx, keep, outputs: dict, eager: dict) -> None:
    """The site's outputs select, per query, min(k_top, visible) distinct visible keys whose
    reference scores are the top ones; values equal the reference scores of their keys; dtypes
    and shapes are the eager model's."""
    spec = site.spec
    for name, tensor in outputs.items():
        assert tensor.dtype == eager[name].dtype and tensor.shape == eager[name].shape, name
    ref = site.reference_scores(hx, hctx, keep)
    visible = torch.isfinite(ref)
    expect = visible.sum(-1).clamp(max=spec.k_top)
    top_ref = ref.sort(-1, descending=True).values[..., :spec.k_top]
    slots = torch.arange(spec.k_top)[None, None, :] < expect[..., None]
    tol = dict(rtol=REL_TOL[spec.dtype],
               atol=REL_TOL[spec.dtype] * max(1e-3, float(ref[visible].abs().max())))
    if "indices" in outputs:
        indices = as_batch(outputs["indices"]).long()
        member = torch.zeros_like(visible).scatter(-1, indices, True) & visible
        assert torch.equal(member.sum(-1), expect), "wrong number of distinct visible keys"
        gathered = ref.gather(-1, indices).sort(-1, descending=True).values
        torch.testing.assert_close(gathered[slots], top_ref[slots], **tol)
    if "values" in outputs:
        values = as_batch(outputs["values"]).double()
        ranked = values.sort(-1, descending=True).values
        torch.testing.assert_close(ranked[slots], top_ref[slots], **tol)
        if "indices" in outputs:
            own = ref.gather(-1, as_batch(outputs["indices"]).long())
            shown = torch.isfinite(own)
            torch.testing.assert_close(values[shown], own[shown], **tol)


def check_host(model, host: HostSpec, inputs, compiled_outputs, eager_outputs) -> None:
    """Positive sites select what the reference selects; negative sites and the unrelated output
    equal eager."""
    y, sites = split_outputs(host, compiled_outputs)
    y_eager, sites_eager = split_outputs(host, eager_outputs)
    torch.testing.assert_close(y, y_eager, rtol=1e-4, atol=1e-5)
    x, ctx, keep = inputs[:3]
    with torch.no_grad():
        hx, hctx = model.stem(x), model.stem(ctx)
    for site, got, want in zip(model.sites, sites, sites_eager):
        try:
            if site.spec.rewritten:
                check_site_selection(site, hx, hctx, keep, want, want)
                check_site_selection(site, hx, hctx, keep, got, want)
            else:
                for name in want:
                    torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
        except AssertionError as error:
            raise AssertionError(f"site {site.spec}: {error}") from None


def check_report(report, host: HostSpec, variant: str = "misa") -> None:
    """Exactly the planted sites: every positive rewritten, every near-miss refused with its
    reason, nothing else (the decoy top-ks are not indexer sites)."""
    rewritten = sorted((r.heads, r.k_top) for r in report.rewritten)
    assert rewritten == sorted((s.heads, s.k_top) for s in host.positives), str(report)
    assert all(r.variant == variant for r in report.rewritten), str(report)
    # Near-misses are told apart by k_top. Those with a required reason must be refused with it;
    # the others may be refused for any reason or not reported at all.
    expected = {s.k_top: s.expected_reason for s in host.negatives}
    refused = collections.defaultdict(list)
    for record in report.refused:
        refused[record.k_top].append(record.reason)
    for k_top, reasons in refused.items():
        assert k_top in expected and len(reasons) == 1, f"unexpected refusal\n{report}"
        assert expected[k_top] in (None, reasons[0]), f"k_top={k_top}: wrong reason\n{report}"
    for k_top, reason in expected.items():
        assert reason is None or k_top in refused, f"k_top={k_top} not refused\n{report}"


def explain(model, inputs, options):
    torch._dynamo.reset()
    with torch.no_grad():
        return misa_compile.explain(model, *inputs, options=options)


def eager(model, inputs):
    with torch.no_grad():
        return model(*inputs)


# ---------------------------------------------------------------------------------------------
# The zoo itself: every positive spelling computes the DSA index score.

@program_settings(40)
@given(spec=st.sampled_from(("batch", "flat")).flatmap(
    lambda layout: positive_specs(layout, heads=4, k_top=5)))
def test_zoo_spellings_compute_the_indexer_math(spec: IndexerSpec):
    host = single_site_host(spec)
    model = build_host(host)
    x, ctx, keep, bias_inf, bias_min = make_inputs(host, QUERIES, KEYS)
    site = model.sites[0]
    with torch.no_grad():
        hx, hctx = model.stem(x), model.stem(ctx)
        scores = as_batch(site.index_scores(hx, hctx, keep, bias_inf, bias_min)).double()
    ref = site.reference_scores(hx, hctx, keep)
    visible = torch.isfinite(ref)
    tol = REL_TOL[spec.dtype]
    torch.testing.assert_close(scores[visible], ref[visible], rtol=tol,
                               atol=tol * float(ref[visible].abs().max()))
    assert (scores[~visible] < -1e30).all(), "hidden keys must rank below every visible key"


# ---------------------------------------------------------------------------------------------
# Every value of every axis, one host per axis: found, rewritten, exact with all heads.

SWEEP = [pytest.param(host, id=f"{axis}{i}") for axis in sorted(AXES) if len(AXES[axis]) > 1
         for i, host in enumerate(axis_sweep_hosts(axis))]


@pytest.mark.parametrize("host", SWEEP)
def test_every_spelling_of_an_axis_is_rewritten_and_exact_with_all_heads(host):
    model = build_host(host)
    inputs = make_inputs(host, QUERIES, KEYS)
    options = misa_options(4)
    check_report(explain(model, inputs, options), host)
    outputs, calls, _ = compile_and_run(model, inputs, options)
    assert calls["misa::routed_topk"] == len(host.sites), calls
    check_host(model, host, inputs, outputs, eager(model, inputs))


# ---------------------------------------------------------------------------------------------
# Composed hosts: several sites, near-misses, decoys, static and dynamic shapes.

# Found by this property: under dynamic shapes the -inf triangle's diagonal is a symbolic size,
# and the site, whose top-k values are used, must still be proven to hide keys with -inf only.
_SYMBOLIC_TRIANGLE = HostSpec(sites=tuple(
    IndexerSpec(qk="einsum", head_sum="mul_sum", scale="none", dtype="fp32", mask=mask,
                layout="flat", outputs=outputs, relu="relu", weights_fn="linear", q_view="none",
                heads=4, dim=4, k_top=k_top, negative=None)
    for mask, outputs, k_top in (("none", "indices", 3), ("triu_additive", "values", 4))),
    layout="flat", embed=16, decoys=True)


@program_settings(16)
@given(host=host_specs(), dynamic=st.booleans(), queries=st.sampled_from((QUERIES, 1)),
       batch=st.sampled_from((2, 1)), seed=seeds)
@example(host=_SYMBOLIC_TRIANGLE, dynamic=True, queries=QUERIES, batch=2, seed=0)
def test_planted_sites_are_found_exactly_and_compiled_output_equals_eager(host, dynamic, queries,
                                                                          batch, seed):
    """Property (1) of docs/graph-pass.md: a random program of planted sites, near-misses and
    decoys, with random weights and inputs; with all heads active every rewritten site selects
    what the reference selects. queries=1 is decode; batch=1 leaves a size-1 batch axis."""
    if queries == 1:
        # A top-k over one query cannot take k > 1 in eager either; a sum over one query is no
        # reduction at all (its top-k ranks each head's scores apart), so no site is there to
        # refuse.
        assume(all(s.negative not in ("topk_over_queries", "sum_over_queries")
                   for s in host.negatives))
    model = build_host(host, seed)
    inputs = make_inputs(host, queries, KEYS, batch=batch, seed=seed)
    heads = host.sites[0].heads
    options = misa_options(heads)
    check_report(explain(model, inputs, options), host)
    other_sizes = (make_inputs(host, max(1, queries - 2), KEYS - 1, batch=batch, seed=seed + 1)
                   if dynamic else None)
    outputs, calls, second = compile_and_run(model, inputs, options, dynamic, other_sizes)
    assert calls["misa::routed_topk"] == len(host.positives), calls
    check_host(model, host, inputs, outputs, eager(model, inputs))
    if dynamic:
        check_host(model, host, other_sizes, second, eager(model, other_sizes))


@pytest.mark.parametrize("host", near_miss_hosts(), ids=("required_reason", "any_refusal"))
def test_near_misses_are_refused_and_left_untouched(host):
    model = build_host(host)
    inputs = make_inputs(host, QUERIES, KEYS)
    check_report(explain(model, inputs, misa_options(4)), host)
    outputs, calls, _ = compile_and_run(model, inputs, misa_options(4))
    assert calls["misa::routed_topk"] == 1, calls
    check_host(model, host, inputs, outputs, eager(model, inputs))


def test_active_heads_above_a_sites_heads_is_refused_as_config_mismatch():
    host = single_site_host(IndexerSpec(heads=4, mask="tril"))
    model = build_host(host)
    inputs = make_inputs(host, QUERIES, KEYS)
    report = explain(model, inputs, misa_options(heads=8))
    assert not report.rewritten, str(report)
    assert [r.reason for r in report.refused] == ["config_mismatch"], str(report)
    outputs, calls, _ = compile_and_run(model, inputs, misa_options(heads=8))
    assert not calls, calls
    for got, want in zip(outputs, eager(model, inputs)):
        torch.testing.assert_close(got, want)


def test_a_model_without_indexers_compiles_unchanged():
    host = HostSpec(sites=())
    model = build_host(host)
    inputs = make_inputs(host, QUERIES, KEYS)
    assert len(explain(model, inputs, misa_options(4))) == 0
    outputs, calls, _ = compile_and_run(model, inputs, misa_options(4))
    assert not calls, calls
    torch.testing.assert_close(outputs[0], eager(model, inputs)[0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Variants: the rewritten graph computes what the references compute.

@program_settings(6)
@given(spec=positive_specs("batch", heads=8, k_top=5), active_heads=st.sampled_from((2, 3)))
def test_routed_heads_select_what_the_misa_reference_selects(spec, active_heads):
    spec = dataclasses.replace(spec, dtype="fp32")
    host = single_site_host(spec)
    model = build_host(host)
    inputs = make_inputs(host, QUERIES, KEYS)
    # block_size=1: a head scores zero in the router only if it adds nothing to any visible key,
    # so router ties can never change the selection.
    options = misa_options(active_heads, block_size=1)
    outputs, calls, _ = compile_and_run(model, inputs, options)
    assert calls["misa::routed_topk"] == 1, calls
    _, (got,) = split_outputs(host, outputs)
    site = model.sites[0]
    with torch.no_grad():
        hx, hctx = model.stem(inputs[0]), model.stem(inputs[1])
    q, k, w, scale = site.reference_inputs(hx, hctx)
    visible = site.visibility(inputs[2])
    heads = reference.route_heads(q, k, w, active_heads, 1, causal=False, mask=visible)
    routed = reference.routed_scores(q, k, w, heads, scale, causal=False, mask=visible)
    routed = routed + site.finite_bias(QUERIES, KEYS)
    expect = visible.sum(-1).clamp(max=spec.k_top)
    slots = torch.arange(spec.k_top)[None, None, :] < expect[..., None]
    top = routed.sort(-1, descending=True).values[..., :spec.k_top]
    tol = dict(rtol=1e-4, atol=1e-4 * float(routed[visible].abs().max()))
    if "indices" in got:
        gathered = routed.gather(-1, got["indices"].long()).sort(-1, descending=True).values
        torch.testing.assert_close(gathered[slots], top[slots], **tol)
    if "values" in got:
        ranked = got["values"].double().sort(-1, descending=True).values
        torch.testing.assert_close(ranked[slots], top[slots], **tol)


@program_settings(6)
@given(spec=st.sampled_from(("batch", "flat")).flatmap(
    lambda layout: positive_specs(layout, heads=8, k_top=5)),
       variant=st.sampled_from(("misa_hier", "hisa")))
def test_exact_variants_equal_eager_when_their_candidates_cover_every_key(spec, variant):
    """misa_hier with more candidates than keys and HISA keeping every block must both return
    the dense selection, whatever heads the router picks."""
    host = single_site_host(spec)
    model = build_host(host)
    inputs = make_inputs(host, QUERIES, KEYS)
    options = misa_options(2, variant=variant, candidates=64, hisa_block=4, hisa_blocks=64)
    check_report(explain(model, inputs, options), host, variant=variant)
    outputs, calls, _ = compile_and_run(model, inputs, options)
    assert calls["misa::rerank_topk"] == 1, calls
    check_host(model, host, inputs, outputs, eager(model, inputs))


# ---------------------------------------------------------------------------------------------
# Inductor: the default target, on a few spellings.

@pytest.mark.parametrize("spec,dynamic", [
    (IndexerSpec(qk="matmul", head_sum="matmul_weights", scale="hf", dtype="bf16_upcast",
                 mask="additive_finfo", outputs="indices"), False),
    (IndexerSpec(qk="einsum", head_sum="mul_sum", scale="before_relu", mask="tril",
                 layout="flat", outputs="both"), True),
])
def test_inductor_target_rewrites_and_equals_eager(spec, dynamic):
    # Without the decoys the dynamic case generates less code: the static case covers them.
    host = single_site_host(spec, decoys=not dynamic)
    model = build_host(host)
    inputs = make_inputs(host, QUERIES, KEYS)
    other_sizes = make_inputs(host, QUERIES - 3, KEYS, seed=1) if dynamic else None
    outputs, calls, second = compile_and_run(model, inputs, misa_options(4, target="inductor"),
                                             dynamic, other_sizes)
    assert calls["misa::routed_topk"] == 1, calls
    check_host(model, host, inputs, outputs, eager(model, inputs))
    if dynamic:
        check_host(model, host, other_sizes, second, eager(model, other_sizes))


# ---------------------------------------------------------------------------------------------
# Hand-written clients in other people's spellings (misa_compile/models/reference_indexers.py).

@pytest.mark.parametrize("block_cls,heads", [(DeepSeekReferenceBlock, 16),
                                             (PackedSparseAttentionBlock, 32)])
def test_hand_written_clients_are_found_and_exact_with_all_heads(block_cls, heads):
    torch.manual_seed(0)
    block = block_cls().eval()
    inputs = block_cls.example_inputs()
    report = explain(block, inputs, misa_options(heads))
    assert [(r.heads, r.k_top) for r in report.rewritten] == [(heads, 8)], str(report)
    assert not report.refused, str(report)
    outputs, calls, _ = compile_and_run(block, inputs, misa_options(heads))
    assert calls["misa::routed_topk"] == 1, calls
    torch.testing.assert_close(outputs, eager(block, inputs), rtol=1e-4, atol=1e-5)
    fewer, calls, _ = compile_and_run(block, inputs, misa_options(4))
    assert calls["misa::routed_topk"] == 1, calls
    assert fewer.shape == outputs.shape and torch.isfinite(fewer).all()
