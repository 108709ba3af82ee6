"""The real client: Hugging Face transformers' DeepseekV32ForCausalLM (tiny random config from
misa_compile.models), compiled whole with backend="misa" and exported through torch.export.

Every layer's indexer must be rewritten; with active heads = all heads the logits equal eager; with
fewer heads the model runs and each layer's indexer recall against the dense indexer is measured on
the same inputs and reported (pytest's record_property, and printed with -s)."""
from __future__ import annotations

import collections
import copy

import pytest
import torch
import torch._dynamo

import misa_compile
from misa_compile.config import MisaConfig
from misa_compile.eval.capture import bind_op_arguments
from misa_compile.kernels import reference
from misa_compile.models import tiny_deepseek_v32

LAYERS, HEADS, TOPK, BATCH, SEQ, PADDING = 2, 8, 8, 2, 24, 5


def padded_batch(input_ids: torch.Tensor) -> dict:
    """The model's inputs with the second sequence left-padded by PADDING tokens."""
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :PADDING] = 0
    return dict(input_ids=input_ids, attention_mask=attention_mask)


@pytest.fixture(scope="module")
def tiny():
    """(model, inputs, eager logits): index_topk=8 of up to 24 visible keys really prunes."""
    model, input_ids = tiny_deepseek_v32(layers=LAYERS, index_heads=HEADS, index_topk=TOPK,
                                         sequence_length=SEQ, batch_size=BATCH)
    inputs = padded_batch(input_ids)
    with torch.no_grad():
        logits = model(**inputs).logits
    return model, inputs, logits


def options(active_heads: int, **fields) -> dict:
    return dict(dict(variant="misa", active_heads=active_heads, block_size=4,
                     target="aot_eager"), **fields)


def indexers(model):
    return [layer.self_attn.indexer for layer in model.model.layers]


def test_every_layers_indexer_is_rewritten(tiny):
    model, inputs, _ = tiny
    torch._dynamo.reset()
    with torch.no_grad():
        report = misa_compile.explain(model, **inputs, options=options(HEADS))
    print(report)
    assert [(r.heads, r.k_top) for r in report.rewritten] == [(HEADS, TOPK)] * LAYERS, str(report)
    assert not report.refused, str(report)
    assert "rewritten" in str(report)


def test_every_indexer_of_a_three_layer_sixteen_head_model_is_rewritten():
    model, input_ids = tiny_deepseek_v32(layers=3, index_heads=16, index_topk=6, seed=1,
                                         sequence_length=16, batch_size=BATCH)
    torch._dynamo.reset()
    with torch.no_grad():
        report = misa_compile.explain(model, **padded_batch(input_ids), options=options(4))
    assert [(r.heads, r.k_top) for r in report.rewritten] == [(16, 6)] * 3, str(report)
    assert not report.refused, str(report)


def test_compiled_model_with_all_heads_equals_eager(tiny):
    model, inputs, eager_logits = tiny
    compiled = torch.compile(model, backend="misa", options=options(HEADS), fullgraph=True)
    with torch.no_grad():
        compiled(**inputs)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            logits = compiled(**inputs).logits
    calls = collections.Counter(e.name for e in prof.events() if e.name.startswith("misa::"))
    assert calls["misa::routed_topk"] == LAYERS, calls
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_default_inductor_target_with_all_heads_equals_eager(tiny):
    """What a user writes: no target option, so Inductor generates the code around the misa ops."""
    model, inputs, eager_logits = tiny
    compiled = torch.compile(model, backend="misa", options={"active_heads": HEADS})
    with torch.no_grad():
        compiled(**inputs)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            logits = compiled(**inputs).logits
    calls = collections.Counter(e.name for e in prof.events() if e.name.startswith("misa::"))
    assert calls["misa::routed_topk"] == LAYERS, calls
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)


def test_compiled_model_with_all_heads_under_dynamic_shapes_equals_eager(tiny):
    model, inputs, eager_logits = tiny
    compiled = torch.compile(model, backend="misa", options=options(HEADS), dynamic=True,
                             fullgraph=True)
    # Fresh ids rather than a slice: a slice's strides would fail a guard and recompile.
    shorter = padded_batch(torch.randint(0, model.config.vocab_size, (BATCH, SEQ - 6),
                                         generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).logits, eager_logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compiled(**shorter).logits, model(**shorter).logits,
                                   rtol=1e-4, atol=1e-5)


def compiled_indexer_recall(model, inputs, config_options):
    """Per-layer recall of the compiled model's indexer selections against the dense HF indexer
    run eagerly on the very inputs the compiled indexer saw (captured by forward hooks)."""
    seen = []

    def capture(module, args, kwargs, selected):
        seen.append((module, args, kwargs, selected))

    hooks = [m.register_forward_hook(capture, with_kwargs=True) for m in indexers(model)]
    try:
        compiled = torch.compile(model, backend="misa", options=config_options, fullgraph=True)
        with torch.no_grad():
            logits = compiled(**inputs).logits
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) == LAYERS
    recalls = []
    with torch.no_grad():
        for module, args, kwargs, selected in seen:
            dense = module(*args, **kwargs)
            recalls.append(_recall(selected, dense, visible=_visible(args[3])))
    return logits, recalls


def _visible(attention_mask: torch.Tensor) -> torch.Tensor:
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def _recall(selected, dense, visible) -> float:
    """Mean of |S' ∩ S| / |S| over the queries that see any key (padding queries see none), S
    the dense selection restricted to visible keys."""
    def as_set(indices):
        return torch.zeros_like(visible).scatter(-1, indices.long(), True) & visible
    truth, chosen = as_set(dense), as_set(selected)
    total = truth.sum(-1).double()
    seeing = total > 0
    return float(((truth & chosen).sum(-1)[seeing] / total[seeing]).mean())


def test_compiled_model_with_fewer_heads_runs_and_reports_indexer_recall(tiny, record_property):
    model, inputs, _ = tiny
    logits, full_recall = compiled_indexer_recall(model, inputs, options(HEADS))
    assert full_recall == [1.0] * LAYERS
    logits, recalls = compiled_indexer_recall(model, inputs, options(2))
    assert logits.shape == (BATCH, SEQ, model.config.vocab_size) and torch.isfinite(logits).all()
    assert all(0.0 <= r <= 1.0 for r in recalls)
    for layer, recall in enumerate(recalls):
        record_property(f"compile_recall_layer{layer}_h2_of_{HEADS}", round(recall, 4))
    print(f"indexer recall vs dense, active_heads=2 of {HEADS}, per layer: "
          f"{[round(r, 3) for r in recalls]}")


# ---------------------------------------------------------------------------------------------
# torch.export

@pytest.fixture(scope="module")
def exported(tiny):
    model, inputs, _ = tiny
    return torch.export.export(model, (), inputs).run_decompositions()


def rewrite_exported(exported_program, active_heads):
    """(rewritten copy of the ExportedProgram, report), rewriting through _transform_do_not_use
    so the program's signature stays in sync with its graph. The pass edits the graph in place,
    hence the copy."""
    from torch.fx.passes.infra.pass_base import PassResult
    from misa_compile.passes.rewrite_indexers import rewrite_indexer_sites

    config = MisaConfig(variant="misa", active_heads=active_heads, block_size=4)
    reports = []

    def rewrite(graph_module):
        reports.append(rewrite_indexer_sites(graph_module, config))
        return PassResult(graph_module, True)

    program = copy.deepcopy(exported_program)._transform_do_not_use(rewrite)
    return program, reports[0]


class MisaCallRecorder(torch.fx.Interpreter):
    """Runs a graph and keeps the arguments and outputs of every misa op it executes."""

    def __init__(self, graph_module):
        super().__init__(graph_module)
        self.calls = []

    def call_function(self, target, args, kwargs):
        out = super().call_function(target, args, kwargs)
        if isinstance(target, torch._ops.OpOverload) and target.namespace == "misa":
            self.calls.append((target, bind_op_arguments(target, args, kwargs), out))
        return out


def test_exported_program_is_rewritten_and_equals_eager_with_all_heads(tiny, exported):
    model, inputs, eager_logits = tiny
    program, report = rewrite_exported(exported, HEADS)
    print(report)
    assert [(r.heads, r.k_top) for r in report.rewritten] == [(HEADS, TOPK)] * LAYERS, str(report)
    assert not report.refused, str(report)
    with torch.no_grad():
        logits = program.module()(**inputs).logits
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-5)


def test_exported_program_with_fewer_heads_reports_indexer_recall(tiny, exported,
                                                                   record_property):
    _, inputs, _ = tiny
    program, report = rewrite_exported(exported, 2)
    assert len(report.rewritten) == LAYERS, str(report)
    recorder = MisaCallRecorder(program.module())
    with torch.no_grad():
        recorder.run(inputs["input_ids"], inputs["attention_mask"])
    selections = [(args, out) for op, args, out in recorder.calls
                  if op is torch.ops.misa.routed_topk.default]
    assert len(selections) == LAYERS
    for layer, (args, (values, indices)) in enumerate(selections):
        dense_values, dense_indices = reference.dense_topk(
            args["q"], args["k"], args["w"], args["k_top"], args["scale"], args["causal"],
            args["key_start"], args["key_end"], args["mask"])
        per_query = reference.selection_recall(indices, values, dense_indices, dense_values)
        seeing = torch.isfinite(dense_values).any(-1)  # padding queries see no key
        recall = float(per_query[seeing].mean())
        assert 0.0 <= recall <= 1.0
        record_property(f"export_recall_layer{layer}_h2_of_{HEADS}", round(recall, 4))
        print(f"export: layer {layer} indexer recall vs dense, active_heads=2 of {HEADS}: "
              f"{recall:.3f}")
