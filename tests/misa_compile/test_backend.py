"""The `misa` torch.compile backend end to end on CPU: found through its entry point, rewrites under
the aot_eager and inductor targets (static and dynamic shapes) with results equal to eager when
active heads = all heads, leaves graphs without indexers exactly as plain Inductor compiles them,
and says clearly what is wrong with bad options or a missing Torch-TensorRT."""
from __future__ import annotations

import functools
import importlib.util
import logging

import pytest
import torch
import torch._dynamo

import misa_compile
from misa_compile import MisaConfig, SiteReport, backend
from misa_compile.passes.pass_manager import MisaInductorPass
from misa_compile.report import SiteRecord

from ..passes.test_find_indexers import (B, H, K, S, T, einsum_masked_fill,
                                         einsum_masked_fill_scores, hf_matmul_weights,
                                         hf_matmul_weights_scores, inputs)
from ..passes.test_rewrite_indexers import check_selection


def options(target: str, **fields) -> dict:
    return dict(dict(variant="misa", active_heads=H, block_size=2, target=target), **fields)


def run(fn, args, opts, dynamic=False):
    compiled = torch.compile(fn, backend="misa", options=opts, dynamic=dynamic, fullgraph=True)
    with torch.no_grad():
        return compiled(*args)


def test_the_entry_point_registers_the_backend():
    assert torch._dynamo.lookup_backend("misa") is backend.misa_backend
    assert "misa" in torch._dynamo.list_backends()


def test_aot_eager_target_equals_eager_and_keeps_the_report():
    q, k, w, visible, _ = inputs()
    backend.clear_reports()
    indices = run(einsum_masked_fill, (q, k, w, visible), options("aot_eager"))
    check_selection(indices, einsum_masked_fill_scores(q, k, w, visible))
    report = backend.last_report()
    assert [(r.heads, r.k_top, r.variant) for r in report.rewritten] == [(H, K, "misa")]
    assert backend.compiled_reports() == [report]


def test_aot_eager_target_with_dynamic_shapes_serves_other_sizes():
    compiled = torch.compile(einsum_masked_fill, backend="misa", options=options("aot_eager"),
                             dynamic=True, fullgraph=True)
    for seed, (queries, keys) in enumerate([(S, T), (S + 1, T + 3)]):
        g = torch.Generator().manual_seed(seed)
        q, k, w = (torch.randn(B, queries, H, 8, generator=g), torch.randn(B, keys, 8, generator=g),
                   torch.randn(B, queries, H, generator=g))
        visible = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)
        with torch.no_grad():
            check_selection(compiled(q, k, w, visible),
                            einsum_masked_fill_scores(q, k, w, visible))
    assert len(backend.last_report().rewritten) == 1


def test_inductor_target_equals_eager_and_reports_even_from_its_cache():
    q, k, w, _, bias = inputs()
    reports = []
    for _ in range(2):  # the second compile may be served by Inductor's FX graph cache
        torch._dynamo.reset()
        indices = run(hf_matmul_weights, (q, k, w, bias), options("inductor"))
        check_selection(indices, hf_matmul_weights_scores(q, k, w, bias))
        reports.append(backend.last_report())
    assert [r.to_dict() for r in reports[0].sites] == [r.to_dict() for r in reports[1].sites]
    assert [(r.heads, r.mask) for r in reports[0].rewritten] == [(H, "additive")]


def test_mode_reaches_inductor_as_the_settings_of_that_mode(monkeypatch):
    # mode="reduce-overhead" must turn on Inductor's CUDA graphs (triton.cudagraphs) with the misa
    # pass still installed; tests/gpu/test_backend_cudagraphs_gpu.py checks on a GPU that graphs
    # are then recorded and replayed. The backend called with both mode and options, as
    # torch.compile cannot pass both.
    from torch._inductor import compile_fx as compile_fx_module

    patches = []
    real_compile_fx = compile_fx_module.compile_fx

    def recording_compile_fx(gm, example_inputs, config_patches=None, **kwargs):
        patches.append(config_patches)
        return real_compile_fx(gm, example_inputs, config_patches=config_patches, **kwargs)

    monkeypatch.setattr(compile_fx_module, "compile_fx", recording_compile_fx)
    misa = functools.partial(backend.misa_backend, mode="reduce-overhead",
                             options=dict(active_heads=H, block_size=2))
    q, k, w, _, bias = inputs()
    with torch.no_grad():
        indices = torch.compile(hf_matmul_weights, backend=misa, fullgraph=True)(q, k, w, bias)
    check_selection(indices, hf_matmul_weights_scores(q, k, w, bias))
    patch = patches[0]  # compile_fx calls itself again inside the patched config
    assert patch["triton.cudagraphs"] is True
    assert isinstance(patch["joint_custom_pre_pass"], MisaInductorPass)
    assert len(backend.last_report().rewritten) == 1


def test_a_graph_without_indexers_compiles_exactly_as_under_plain_inductor():
    def no_indexer(x, y):
        scores = torch.relu(x @ y)
        return scores.topk(3).indices, scores.softmax(-1) * 2

    x, y = torch.randn(6, 5), torch.randn(5, 9)
    with torch.no_grad():
        plain = torch.compile(no_indexer, backend="inductor")(x, y)
        torch._dynamo.reset()
        misa = run(no_indexer, (x, y), options("inductor"))
    assert len(backend.last_report()) == 0
    for got, want in zip(misa, plain):
        assert torch.equal(got, want)


def test_tensorrt_target_names_torch_tensorrt_when_it_is_missing():
    if importlib.util.find_spec("torch_tensorrt") is not None:
        pytest.skip("torch_tensorrt is installed here")
    q, k, w, visible, _ = inputs()
    with pytest.raises(Exception, match="torch_tensorrt") as raised:
        run(einsum_masked_fill, (q, k, w, visible), options("tensorrt"))
    chain, error = [], raised.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or getattr(error, "inner_exception", None)
    assert any(isinstance(e, ImportError) for e in chain)


@pytest.mark.parametrize("bad,match", [
    ({"target": "tvm"}, r"'tvm'; allowed values are .*inductor"),
    ({"target": "aot_eager", "unroll": 2}, r"unknown options \['unroll'\]"),
    ({"target": "inductor", "not_an_inductor_option": 1}, r"not_an_inductor_option"),
    ({"variant": "sparse"}, r"variant='sparse'"),
])
def test_bad_options_are_named_in_the_error(bad, match):
    q, k, w, visible, _ = inputs()
    with pytest.raises(Exception, match=match):
        run(einsum_masked_fill, (q, k, w, visible), bad)


def test_inductor_pass_uuid_follows_the_configuration():
    def noop(report):
        pass

    first = MisaInductorPass(MisaConfig(active_heads=4), noop).uuid()
    assert first == MisaInductorPass(MisaConfig(active_heads=4), noop).uuid()
    assert first != MisaInductorPass(MisaConfig(active_heads=2), noop).uuid()
    assert first != MisaInductorPass(MisaConfig(active_heads=4), noop,
                                     python_scalar_inputs=[3]).uuid()
    assert isinstance(first, str) and len(first) == 64


def test_explain_returns_the_report_prints_a_table_and_logs(caplog):
    q, k, w, visible, _ = inputs()
    with caplog.at_level(logging.INFO, logger="misa_compile"):
        report = misa_compile.explain(einsum_masked_fill, q, k, w, visible,
                                      options={"active_heads": H + 1})
    assert isinstance(report, SiteReport)
    (record,) = report.refused
    assert record.reason == "config_mismatch"
    table = str(report)
    assert "1 refused" in table and "config_mismatch" in table and record.name in table
    assert report.to_dict()["sites"][0]["reason"] == "config_mismatch"
    assert any("config_mismatch" in r.getMessage() for r in caplog.records)


def test_report_merges_and_validates_its_records():
    done = SiteRecord("a:topk", "rewritten", variant="misa", heads=8, k_top=4)
    left = SiteRecord("b:topk", "refused", reason="not_relu", detail="gelu")
    merged = SiteReport([done]).merge(SiteReport([left]))
    assert merged.rewritten == [done] and merged.refused == [left]
    assert merged.to_dict()["rewritten"] == 1
    with pytest.raises(ValueError, match="status"):
        SiteRecord("c", "skipped")


def test_a_setting_that_cannot_apply_warns_when_compiling():
    from misa_compile.unapplied import UnappliedSettingWarning

    from ..export.factories import indexer_host

    torch._dynamo.reset()
    model, args = indexer_host(heads=4)
    compiled = torch.compile(model, backend="misa",
                             options={"active_heads": 99, "target": "aot_eager"})
    # Inference, as served: under autograd the joint graph also keeps the scores for backward.
    with pytest.warns(UnappliedSettingWarning, match="config_mismatch"), torch.no_grad():
        compiled(*args)
    assert backend.last_report().refused[0].reason == "config_mismatch"


def test_a_setting_that_applies_compiles_without_that_warning():
    import warnings

    from misa_compile.unapplied import UnappliedSettingWarning

    from ..export.factories import indexer_host

    torch._dynamo.reset()
    model, args = indexer_host(heads=4)
    compiled = torch.compile(model, backend="misa",
                             options={"active_heads": 2, "block_size": 2, "target": "aot_eager"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnappliedSettingWarning)
        with torch.no_grad():
            compiled(*args)
    assert len(backend.last_report().rewritten) == 1
