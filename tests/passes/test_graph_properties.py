"""Graph-level properties of the pass over generated indexer programs (tests/passes/indexer_zoo.py),
as docs/graph-pass.md, "Properties", states them. Property (1), every rewritten program equals
eager with all heads active, is test_spellings.py's planted-sites test; here:

(2) a near-miss alone in a program is left untouched: no misa op runs, the report refuses it
    (with its reason where one is required) or does not list it, and the outputs equal eager;
(3) with h < H the router's guarantees: a head whose weight is zero is the one left out when
    h = H-1 (recall of the dense selection 1), and MISA-hier's tie-free per-query recall is at
    least MISA's."""
from __future__ import annotations

import dataclasses

import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

import misa_compile
from misa_compile.kernels import reference

from .indexer_zoo import (IndexerSpec, build_host, make_inputs, negative_specs, positive_specs,
                          program_settings, seeds, single_site_host, split_outputs)
from .test_spellings import (KEYS, QUERIES, check_report, check_site_selection, compile_and_run,
                             eager, misa_options)

HEADS, K_TOP = 4, 5


@program_settings(6)
@given(spec=negative_specs(HEADS, K_TOP), seed=seeds)
# Once rewritten with the queries as heads: q's heads-first view put S right before D.
@example(spec=IndexerSpec(negative="sum_over_queries", q_view="heads_first", k_top=K_TOP),
         seed=0)
def test_a_near_miss_is_left_untouched(spec, seed):
    host = single_site_host(spec, decoys=False)
    model = build_host(host, seed)
    inputs = make_inputs(host, QUERIES, KEYS, seed=seed)
    outputs, calls, _ = compile_and_run(model, inputs, misa_options(HEADS))
    check_report(misa_compile.backend.last_report(), host)
    assert not calls, calls
    for got, want in zip(outputs, eager(model, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _site_with_a_silent_head(spec, seed, silent_head):
    """A one-site host whose weight projection gives `silent_head` the weight 0 for every query."""
    host = single_site_host(spec, decoys=False)
    model = build_host(host, seed)
    with torch.no_grad():
        model.sites[0].weights_proj.weight[silent_head] = 0
    return host, model


@program_settings(8)
@given(spec=positive_specs("batch", HEADS, K_TOP), seed=seeds,
       silent_head=st.integers(0, HEADS - 1))
def test_leaving_out_a_zero_weight_head_recalls_the_dense_selection(spec, seed, silent_head):
    """h = H-1, router blocks of one key: a head with w = 0 has router score 0, and any head the
    router may prefer to drop instead (score 0 too) adds nothing to a visible key, so the routed
    score equals the dense one and the selection is dense's up to ties."""
    # Softmax/sigmoid weights are never zero, so the zeroed projection must be the weight itself.
    spec = dataclasses.replace(spec, weights_fn="linear")
    host, model = _site_with_a_silent_head(spec, seed, silent_head)
    inputs = make_inputs(host, QUERIES, KEYS, seed=seed)
    outputs, calls, _ = compile_and_run(model, inputs, misa_options(HEADS - 1, block_size=1))
    assert calls["misa::routed_topk"] == 1, calls
    site = model.sites[0]
    with torch.no_grad():
        hx, hctx = model.stem(inputs[0]), model.stem(inputs[1])
    (got,), (want,) = split_outputs(host, outputs)[1], split_outputs(host, eager(model, inputs))[1]
    check_site_selection(site, hx, hctx, inputs[2], got, want)


def _hits(selected: torch.Tensor, dense: torch.Tensor, k_top: int) -> torch.Tensor:
    """Per query, how many selected keys score at least the k-th best dense score (a key tied
    with the last one dense selects counts: ties are unordered)."""
    threshold = dense.topk(k_top, dim=-1).values[..., -1:]
    margin = 1e-4 * dense[torch.isfinite(dense)].abs().max()
    return (dense.gather(-1, selected) >= threshold - margin).sum(-1)


def _tie_free(scores: torch.Tensor, first: int, second: int) -> torch.Tensor:
    """Per query, whether the first-th and second-th largest scores are apart (so any top-first
    and top-second of these scores nest, whatever order ties take). Hidden keys score -inf: a
    finite score is apart from them, two hidden ones are not (their difference is NaN)."""
    ranked = scores.sort(-1, descending=True).values
    gap = ranked[..., first - 1] - ranked[..., second - 1]
    return gap > 1e-3 * ranked[torch.isfinite(ranked)].abs().max()


@program_settings(5)
@given(spec=positive_specs("batch", 8, K_TOP), seed=seeds,
       candidates=st.integers(K_TOP, 2 * K_TOP), active_heads=st.integers(1, 3))
def test_misa_hier_recalls_at_least_what_misa_recalls_per_query(spec, seed, candidates,
                                                                 active_heads):
    """MISA's k_top keys lie among MISA-hier's candidates (the top `candidates` of the same routed
    score) wherever that score has no tie straddling the k_top-th and candidates-th places and
    the router none between its h-th and (h+1)-th heads; the re-rank then keeps every dense key
    among the candidates. Checked on those queries."""
    spec = dataclasses.replace(spec, dtype="fp32", outputs="indices", mask="tril")
    host = single_site_host(spec, decoys=False)
    model = build_host(host, seed)
    inputs = make_inputs(host, QUERIES, KEYS, seed=seed)
    chosen = {}
    for variant in ("misa", "misa_hier"):
        options = misa_options(active_heads, variant=variant, candidates=candidates)
        outputs, _, _ = compile_and_run(model, inputs, options)
        chosen[variant] = split_outputs(host, outputs)[1][0]["indices"]
    site = model.sites[0]
    with torch.no_grad():
        hx, hctx = model.stem(inputs[0]), model.stem(inputs[1])
    q, k, w, scale = site.reference_inputs(hx, hctx)
    visible = site.visibility(inputs[2])
    dense = site.reference_scores(hx, hctx, inputs[2])
    router = reference.router_scores(q, k, w, 4, causal=False, mask=visible)
    heads = router.topk(active_heads, dim=-1).indices
    routed = reference.routed_scores(q, k, w, heads, scale, causal=False, mask=visible)
    checked = (_tie_free(router, active_heads, active_heads + 1)
               & _tie_free(routed, K_TOP, candidates + 1))
    assume(checked.any())
    hier, misa = _hits(chosen["misa_hier"], dense, K_TOP), _hits(chosen["misa"], dense, K_TOP)
    assert (hier[checked] >= misa[checked]).all(), (hier, misa, checked)
