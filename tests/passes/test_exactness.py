"""The pass never changes a model's meaning: where the graph alone cannot prove that the rewrite
equals eager for every run-time value (a Python float Dynamo passes as an input, a finite fill,
a cast, a symbolic k_top, a parameter), the site is guarded, made exact, or refused.

Each model here is compiled with backend="misa" and compared with eager after the run-time value
changes; selections are compared by gathered scores (ties are unordered)."""
from __future__ import annotations

import logging

import pytest
import torch

import misa_compile
from misa_compile import MisaConfig
from misa_compile.passes import find_indexers, graph_builder, reasons
from misa_compile.passes.rewrite_indexers import rewrite_indexer_sites

from .test_find_indexers import aten_graph
from .test_rewrite_indexers import check_selection

B, S, T, H, D, K = 2, 5, 7, 4, 8, 3
OPTIONS = {"target": "aot_eager", "active_heads": H, "block_size": 2}


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, H, D, generator=g), torch.randn(B, T, D, generator=g),
            torch.randn(B, S, H, generator=g))


def _index(q, k, w):
    return torch.einsum("bsht,bsh->bst", torch.einsum("bshd,btd->bsht", q, k).relu(), w)


def _causal():
    return torch.ones(S, T, dtype=torch.bool).tril(T - S)


def _sites(report):
    return [(r.status, r.reason) for r in report.sites]


# --- a Python float attribute scales the score --------------------------------------------------

class ScaledAfterMask(torch.nn.Module):
    """c * masked(score): a negative c un-hides the masked keys (-inf becomes +inf), c = 0 makes
    them NaN, so the selection depends on the sign of a number Dynamo passes at run time."""

    def __init__(self):
        super().__init__()
        self.c = 0.5

    def forward(self, q, k, w):
        return (_index(q, k, w).masked_fill(~_causal(), float("-inf")) * self.c).topk(K).indices


class ScaledBeforeMask(ScaledAfterMask):
    """masked(c * score): exact for every c once c is folded into the weights."""

    def forward(self, q, k, w):
        return (_index(q, k, w) * self.c).masked_fill(~_causal(), float("-inf")).topk(K).indices



@pytest.mark.parametrize("dynamic", [None, True])
def test_a_python_float_after_the_mask_is_never_folded_by_its_example_sign(dynamic):
    q, k, w = _inputs()
    model = ScaledAfterMask()
    compiled = torch.compile(model, backend="misa", options=OPTIONS, dynamic=dynamic)
    for c in (0.5, -0.5, 0.0):
        model.c = c
        with torch.no_grad():
            got, expected = compiled(q, k, w), model(q, k, w)
        # Hidden keys lead (c < 0) or are NaN (c = 0) in eager: the indices must be the same set.
        assert torch.equal(got.sort(-1).values, expected.sort(-1).values), c
    report = misa_compile.backend.last_report()
    assert _sites(report) == [("refused", reasons.UNKNOWN_SCALE)], str(report)


@pytest.mark.parametrize("dynamic", [None, True])
def test_a_python_float_before_the_mask_is_folded_exactly_for_every_value(dynamic):
    q, k, w = _inputs()
    model = ScaledBeforeMask()
    compiled = torch.compile(model, backend="misa", options=OPTIONS, dynamic=dynamic)
    for c in (0.5, -0.5, 0.0):
        model.c = c
        with torch.no_grad():
            got = compiled(q, k, w)
        check_selection(got, (_index(q, k, w) * c).masked_fill(~_causal(), float("-inf")))
        assert misa_compile.backend.last_report().rewritten, c


# --- a parameter whose values happen to be equal -----------------------------------------------

class ParameterScale(torch.nn.Module):
    """relu(q.k) * alpha with alpha a parameter: all its values are equal at compile time, but it
    can be trained or loaded afterwards, so its value (and sign) is not a constant."""

    def __init__(self):
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.full((), 0.5))

    def forward(self, q, k, w):
        scores = torch.einsum("bshd,btd->bsht", q, k).relu() * self.alpha
        index = torch.einsum("bsht,bsh->bst", scores, w)
        return index.masked_fill(~_causal(), float("-inf")).topk(K).indices


def test_a_parameter_with_equal_values_is_not_baked_in_as_a_constant():

    model = ParameterScale()
    q, k, w = _inputs()
    # An unlifted exported module reads its parameters with get_attr.
    gm = torch.export.export(model, (q, k, w)).run_decompositions().module()
    report = rewrite_indexer_sites(gm, MisaConfig(active_heads=H, block_size=2))
    with torch.no_grad():
        gm.alpha.fill_(-0.5)
        model.alpha.fill_(-0.5)
        assert torch.equal(gm(q, k, w).sort(-1).values, model(q, k, w).sort(-1).values)
    assert _sites(report) == [("refused", reasons.UNKNOWN_SCALE)], str(report)


# --- k_top against the candidate sets of misa_hier and HISA --------------------------------------

def _half_the_keys(q, k, w):
    """k_top = T // 2: symbolic under dynamic shapes, so its example value proves nothing."""
    index = _index(q, k, w).masked_fill(~torch.ones(q.shape[1], k.shape[1], dtype=torch.bool)
                                        .tril(k.shape[1] - q.shape[1]), float("-inf"))
    return index.topk(k.shape[1] // 2)


def _check_half_the_keys(got, q, k, w):
    keys = k.shape[1]
    dense = _index(q, k, w).masked_fill(
        ~torch.ones(q.shape[1], keys, dtype=torch.bool).tril(keys - q.shape[1]), float("-inf"))
    ranked = dense.sort(-1, descending=True).values[..., :keys // 2]
    torch.testing.assert_close(got.values.sort(-1, descending=True).values, ranked)


def test_a_symbolic_k_top_beyond_the_misa_hier_candidates_is_refused():
    options = dict(OPTIONS, variant="misa_hier", candidates=4)
    compiled = torch.compile(_half_the_keys, backend="misa", options=options, dynamic=True)
    for keys in (7, 16):  # k_top = 3 (within the 4 candidates), then 8
        g = torch.Generator().manual_seed(keys)
        q, k, w = (torch.randn(B, S, H, D, generator=g), torch.randn(B, keys, D, generator=g),
                   torch.randn(B, S, H, generator=g))
        with torch.no_grad():
            _check_half_the_keys(compiled(q, k, w), q, k, w)
    report = misa_compile.backend.last_report()
    assert _sites(report) == [("refused", reasons.CONFIG_MISMATCH)], str(report)


def test_hisa_with_fewer_candidate_keys_than_k_top_is_refused():
    options = dict(OPTIONS, variant="hisa", hisa_block=1, hisa_blocks=2)
    q, k, w = _inputs()
    with torch.no_grad():
        got = torch.compile(_half_the_keys, backend="misa", options=options)(q, k, w)
    _check_half_the_keys(got, q, k, w)
    report = misa_compile.backend.last_report()
    assert _sites(report) == [("refused", reasons.CONFIG_MISMATCH)], str(report)


# --- failures inside the pass ---------------------------------------------------------------------

def _values_and_indices(q, k, w):
    values, indices = _index(q, k, w).masked_fill(~_causal(), float("-inf")).topk(K)
    return values * 2, indices


def test_a_rewrite_that_fails_after_building_half_its_outputs_restores_the_graph(monkeypatch):

    q, k, w = _inputs()
    gm = aten_graph(_values_and_indices, q, k, w)
    before = gm.print_readable(print_output=False)
    original = graph_builder.Arranger.from_canonical
    calls = []

    def second_call_fails(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the values are in place, the indices fail
            raise RuntimeError("injected")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(graph_builder.Arranger, "from_canonical", second_call_fails)
    report = rewrite_indexer_sites(gm, MisaConfig(active_heads=H, block_size=2))
    assert _sites(report) == [("refused", reasons.INTERNAL_ERROR)], str(report)
    assert gm.print_readable(print_output=False) == before


def test_an_analysis_failure_is_reported_and_logs_its_traceback_at_debug_only(monkeypatch,
                                                                                caplog):

    def broken(*args, **kwargs):
        raise ZeroDivisionError("injected")

    q, k, w = _inputs()
    gm = aten_graph(_values_and_indices, q, k, w)
    before = gm.print_readable(print_output=False)
    monkeypatch.setattr(find_indexers, "prove_roles", broken)
    with caplog.at_level(logging.DEBUG, logger="misa_compile"):
        report = rewrite_indexer_sites(gm, MisaConfig(active_heads=H, block_size=2))
    assert _sites(report) == [("refused", reasons.INTERNAL_ERROR)], str(report)
    assert "ZeroDivisionError: injected" in report.sites[0].detail
    assert gm.print_readable(print_output=False) == before
    loud = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert loud and all(r.exc_info is None for r in loud)
    assert any(r.exc_info and r.levelno == logging.DEBUG for r in caplog.records)


# --- finite fills ------------------------------------------------------------------------------

class SoftmaxOverSelected(torch.nn.Module):
    """Attention over the selected keys, weighted by their index scores: a padding row (no
    visible key) is uniform in eager, where the fill is finite; with -inf it would be NaN."""

    def __init__(self, fill):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, w, visible):
        values, indices = _index(q, k, w).masked_fill(~visible, self.fill).topk(K)
        return values.softmax(-1), indices


@pytest.mark.parametrize("fill", [torch.finfo(torch.float32).min, -1e30])
def test_used_top_k_values_of_a_finite_fill_keep_eager_semantics(fill):
    q, k, w = _inputs()
    visible = _causal().expand(B, S, T).clone()
    visible[1, :2] = False  # padding rows: no visible key at all
    model = SoftmaxOverSelected(fill)
    with torch.no_grad():
        expected, _ = model(q, k, w, visible)
        got, _ = torch.compile(model, backend="misa", options=OPTIONS)(q, k, w, visible)
    assert not expected.isnan().any()
    torch.testing.assert_close(got, expected)
    report = misa_compile.backend.last_report()
    assert _sites(report) == [("refused", reasons.UNKNOWN_MASK)], str(report)


# --- additive biases that hide keys -------------------------------------------------------------

class SoftmaxOverBiased(torch.nn.Module):
    """SoftmaxOverSelected with the keys hidden by an additive bias read from the input."""

    def forward(self, q, k, w, bias):
        values, indices = (_index(q, k, w) + bias).topk(K)
        return values.softmax(-1), indices


def _padded_bias(hide: float) -> torch.Tensor:
    visible = _causal().expand(B, S, T).clone()
    visible[1, :2] = False  # padding rows: no visible key at all
    return torch.zeros(B, S, T).masked_fill(~visible, hide)


@pytest.mark.parametrize("hide", [torch.finfo(torch.float32).min, torch.finfo(torch.bfloat16).min,
                                  torch.finfo(torch.float16).min, float("-inf")])
def test_used_top_k_values_of_an_input_bias_keep_eager_semantics(hide):
    """An input bias may hold any value, -inf included: the pass cannot prove it hides only
    with -inf, so with the values used the site is refused whatever the bias holds at run time."""
    q, k, w = _inputs()
    bias = _padded_bias(hide)
    model = SoftmaxOverBiased()
    with torch.no_grad():
        expected, _ = model(q, k, w, bias)
        got, _ = torch.compile(model, backend="misa", options=OPTIONS)(q, k, w, bias)
    torch.testing.assert_close(got, expected, equal_nan=True)
    report = misa_compile.backend.last_report()
    assert _sites(report) == [("refused", reasons.UNKNOWN_MASK)], str(report)
    assert "not proven to hide keys only with -inf" in report.sites[0].detail


def test_top_k_indices_under_an_input_bias_are_still_rewritten():
    """Only the values carry the finite hidden score; indices-only sites keep their rewrite."""
    q, k, w = _inputs()
    bias = _padded_bias(torch.finfo(torch.float32).min)
    model = lambda q, k, w, bias: (_index(q, k, w) + bias).topk(K).indices  # noqa: E731
    report = misa_compile.explain(model, q, k, w, bias, options=OPTIONS)
    assert _sites(report) == [("rewritten", "")], str(report)


def _built_bias_values(q, k, w, hide):
    """The Hugging Face spelling, built in the graph: where(key <= query, 0, hide), added."""
    keys, queries = torch.arange(T), torch.arange(S) + (T - S)
    bias = torch.where(keys[None, :] <= queries[:, None], 0.0, hide)
    return (_index(q, k, w) + bias).topk(T - 1)  # the first query sees fewer keys than that


@pytest.mark.parametrize("hide", [torch.finfo(torch.float32).min, torch.finfo(torch.bfloat16).min,
                                  torch.finfo(torch.float16).min])
def test_used_top_k_values_of_a_finite_bias_built_in_the_graph_are_refused(hide):
    q, k, w = _inputs()
    with torch.no_grad():
        expected = _built_bias_values(q, k, w, hide)
        got = torch.compile(_built_bias_values, backend="misa", options=OPTIONS)(q, k, w, hide)
    report = misa_compile.backend.last_report()
    assert _sites(report) == [("refused", reasons.UNKNOWN_MASK)], str(report)
    assert f"at most {hide:g}" in report.sites[0].detail, report.sites[0].detail
    assert torch.isfinite(expected.values).all()
    torch.testing.assert_close(got.values, expected.values)


def test_used_top_k_values_of_a_minus_inf_bias_built_in_the_graph_are_rewritten_exactly():
    """0 where visible and -inf elsewhere is proven: eager's hidden values are -inf as well."""
    q, k, w = _inputs()
    with torch.no_grad():
        expected = _built_bias_values(q, k, w, float("-inf"))
        got = torch.compile(_built_bias_values, backend="misa",
                            options=OPTIONS)(q, k, w, float("-inf"))
    assert _sites(misa_compile.backend.last_report()) == [("rewritten", "")]
    assert expected.values.isinf().any()
    torch.testing.assert_close(got.values.sort(-1).values, expected.values.sort(-1).values)


# --- casts -------------------------------------------------------------------------------------

def _bf16_rounded_q(q, k, w):
    """q rounded to bf16 after a merge of (batch, query): the rewrite reads q from before the
    reshape (its layout is simpler) and must keep the rounding the contraction saw."""
    rows = q.reshape(B * S, H, D).to(torch.bfloat16).float()
    keys = k[:, None].expand(B, S, T, D).reshape(B * S, T, D)
    scores = torch.bmm(rows, keys.transpose(1, 2)).view(B, S, H, T).relu()
    return (scores * w[..., None]).sum(2).topk(K)


def test_a_rounding_cast_on_an_operand_is_kept_by_the_rewrite():
    q, k, w = _inputs()
    with torch.no_grad():
        expected = _bf16_rounded_q(q, k, w)
        got = torch.compile(_bf16_rounded_q, backend="misa", options=OPTIONS)(q, k, w)
    assert misa_compile.backend.last_report().rewritten
    torch.testing.assert_close(got.values, expected.values, rtol=1e-6, atol=1e-6)


def _near_tied_keys():
    """Head 0 alone scores key s as 1 + 0.0005 s (every key rounds to 1.0 in bf16); a bias
    0.0002 * (T - s) falls with s by less than the score rises, so the exact score ranks the
    last keys first and the bf16-rounded score plus the bias the first keys."""
    q = torch.zeros(B, S, H, D)
    q[..., 0, 0] = 1.0
    k = torch.zeros(B, T, D)
    k[..., 0] = 1.0 + 0.0005 * torch.arange(T)
    w = torch.zeros(B, S, H)
    w[..., 0] = 1.0
    bias = 0.0002 * (T - torch.arange(T, dtype=torch.float32)).expand(B, S, T)
    return q, k, w, bias


def _rounded_then_biased(q, k, w, bias):
    return (_index(q, k, w).to(torch.bfloat16) + bias).topk(K).indices


def _rounded_then_masked_and_scaled(q, k, w, bias):
    masked = _index(q, k, w).to(torch.bfloat16).masked_fill(~_causal(), float("-inf"))
    return (masked * 0.5).topk(K).indices


def _per_head_rounded(q, k, w, bias):
    per_head = torch.einsum("bshd,btd->bsht", q, k).relu().to(torch.bfloat16).float()
    return (torch.einsum("bsht,bsh->bst", per_head, w) + bias).topk(K).indices


def test_a_bias_added_after_a_rounding_cast_is_refused_and_the_model_keeps_its_selection():
    inputs = _near_tied_keys()
    with torch.no_grad():
        expected = _rounded_then_biased(*inputs)
        got = torch.compile(_rounded_then_biased, backend="misa", options=OPTIONS)(*inputs)
    report = misa_compile.backend.last_report()
    assert _sites(report) == [("refused", reasons.ROUNDING_CAST)], str(report)
    assert torch.equal(got.sort(-1).values, expected.sort(-1).values)
    assert torch.equal(expected.sort(-1).values[0, 0], torch.arange(K))  # the bias decided


def test_a_rounding_cast_on_the_per_head_score_is_refused():
    inputs = _near_tied_keys()
    report = misa_compile.explain(_per_head_rounded, *inputs, options=OPTIONS)
    assert _sites(report) == [("refused", reasons.ROUNDING_CAST)], str(report)


def test_a_rounding_cast_with_only_masks_and_scales_after_it_is_rewritten():
    """Rounding is monotone: the exact top-k is one of the rounded score's top-k sets."""
    q, k, w, bias = _inputs() + (None,)
    with torch.no_grad():
        got = torch.compile(_rounded_then_masked_and_scaled, backend="misa",
                            options=OPTIONS)(q, k, w, bias)
    assert _sites(misa_compile.backend.last_report()) == [("rewritten", "")]
    rounded = (_index(q, k, w).to(torch.bfloat16).float() * 0.5)
    check_selection(got, rounded.masked_fill(~_causal(), float("-inf")))
