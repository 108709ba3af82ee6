"""Whole-model compiles of the tiny transformers DSA models (DeepSeek-V3.2, GLM-MoE-DSA): the
causal mask the model builds from its positions reaches the misa ops as causal=True; a 2-D
padding mask stays a mask next to it; position_ids passed in (packed sequences) become causal=True
plus ragged key ranges; logits and indexer selections equal eager with all heads active."""
from __future__ import annotations

import pytest
import torch

import misa_compile
from misa_compile.models import tiny_deepseek_v32, tiny_glm_moe_dsa

LAYERS, HEADS, TOPK, BATCH, SEQ = 2, 8, 8, 2, 16
FACTORIES = {"deepseek_v32": tiny_deepseek_v32, "glm_moe_dsa": tiny_glm_moe_dsa}


@pytest.fixture(scope="module", params=sorted(FACTORIES))
def tiny(request):
    return FACTORIES[request.param](layers=LAYERS, index_heads=HEADS, index_topk=TOPK,
                                    sequence_length=SEQ, batch_size=BATCH)


def options(**fields):
    return dict(dict(variant="misa", active_heads=HEADS, block_size=4, target="aot_eager"),
                **fields)


def test_the_models_causal_mask_is_folded_into_causal(tiny):
    model, input_ids = tiny
    with torch.no_grad():
        report = misa_compile.explain(model, input_ids, options=options())
    assert [r.visibility for r in report.rewritten] == ["causal"] * LAYERS, str(report)
    assert not report.refused


@pytest.mark.parametrize("padded", [False, True])
def test_compiled_logits_equal_eager_with_the_folded_visibility(tiny, padded):
    model, input_ids = tiny
    inputs = dict(input_ids=input_ids)
    if padded:
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, :5] = 0
        inputs["attention_mask"] = attention_mask
    misa_compile.backend.clear_reports()
    compiled = torch.compile(model, backend="misa", options=options(), fullgraph=True)
    with torch.no_grad():
        eager = model(**inputs).logits
        logits = compiled(**inputs).logits
    torch.testing.assert_close(logits, eager, rtol=1e-4, atol=1e-5)
    expected = "causal+mask" if padded else "causal"
    report = misa_compile.backend.last_report()
    assert [r.visibility for r in report.rewritten] == [expected] * LAYERS, str(report)


@pytest.mark.slow
def test_default_inductor_target_reports_causal(tiny):
    """Inductor's own decompositions build the mask with other ops than AOT's defaults."""
    model, input_ids = tiny
    misa_compile.backend.clear_reports()
    compiled = torch.compile(model, backend="misa", options={"active_heads": 4,
                                                             "block_size": 4})
    with torch.no_grad():
        compiled(input_ids)
    report = misa_compile.backend.last_report()
    assert [r.visibility for r in report.rewritten] == ["causal"] * LAYERS, str(report)


def packed(*lengths: int) -> torch.Tensor:
    """Positions of sequences of these lengths packed into one row, each restarting at 0."""
    return torch.cat([torch.arange(n) for n in lengths])


POSITIONS = {
    "arange": torch.arange(SEQ).expand(BATCH, SEQ),
    "packed": packed(10, 6).expand(BATCH, SEQ),
    "packed differently per row": torch.stack([packed(10, 6), packed(3, 4, 9)]),
    "packed, one row for the batch": packed(5, 11)[None],  # expanded by create_causal_mask
}


def indexers(model):
    return [layer.self_attn.indexer for layer in model.model.layers]


def visible_selection(indices: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The selected keys as a [B,S,T] set, restricted to the visible ones (a query of a short
    packed sequence sees fewer than index_topk keys; its other picks are arbitrary hidden keys)."""
    visible = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return torch.zeros_like(visible).scatter(-1, indices.long(), True) & visible


@pytest.mark.parametrize("positions", sorted(POSITIONS))
def test_position_ids_passed_in_fold_into_key_ranges_and_select_what_eager_selects(tiny,
                                                                                   positions):
    """create_causal_mask given position_ids (no attention mask, no cache) builds the packed-
    sequence mask from them: same label and P[kv] <= P[q]. It reaches the ops as causal=True and
    the segments' key ranges, no mask; each layer's indexer picks the same visible keys as the eager indexer on the
    inputs the compiled one saw (captured by forward hooks), and the logits equal eager."""
    model, input_ids = tiny
    position_ids = POSITIONS[positions]
    seen = []
    hooks = [m.register_forward_hook(lambda m, a, k, out: seen.append((m, a, k, out)),
                                     with_kwargs=True) for m in indexers(model)]
    misa_compile.backend.clear_reports()
    try:
        compiled = torch.compile(model, backend="misa", options=options(), fullgraph=True)
        with torch.no_grad():
            logits = compiled(input_ids=input_ids, position_ids=position_ids).logits
    finally:
        for hook in hooks:
            hook.remove()
    report = misa_compile.backend.last_report()
    assert [r.visibility for r in report.rewritten] == ["causal+ranges"] * LAYERS, \
        str(report)
    assert len(seen) == LAYERS
    with torch.no_grad():
        eager = model(input_ids=input_ids, position_ids=position_ids).logits
        for module, args, kwargs, selected in seen:
            mask = args[3]
            assert torch.equal(visible_selection(selected, mask),
                               visible_selection(module(*args, **kwargs), mask))
            # Not vacuous: packed positions really hide keys plain causality shows.
            causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril().expand(BATCH, SEQ, SEQ)
            hides = not torch.equal(visible_selection(torch.arange(SEQ).expand(BATCH, SEQ, SEQ),
                                                      mask), causal)
            assert hides == (positions != "arange")
    torch.testing.assert_close(logits, eager, rtol=1e-4, atol=1e-5)



@pytest.mark.slow
def test_default_inductor_target_compiles_the_segment_ranges(tiny):
    """Inductor lowers the key-range nodes the rewrite adds after its decompositions (cummax,
    cummin, index; no op it would only decompose) and the logits equal eager."""
    model, input_ids = tiny
    position_ids = POSITIONS["packed differently per row"]
    misa_compile.backend.clear_reports()
    compiled = torch.compile(model, backend="misa", options={"active_heads": HEADS,
                                                             "block_size": 4})
    with torch.no_grad():
        logits = compiled(input_ids=input_ids, position_ids=position_ids).logits
        eager = model(input_ids=input_ids, position_ids=position_ids).logits
    report = misa_compile.backend.last_report()
    assert [r.visibility for r in report.rewritten] == ["causal+ranges"] * LAYERS, \
        str(report)
    torch.testing.assert_close(logits, eager, rtol=1e-4, atol=1e-4)


# Ops torch 2.11's Inductor decomposes and cannot lower after its decompositions; the rewrite
# runs after them, so it must never insert these there (graph_builder.py).
DECOMPOSED_IN_TORCH_2_11 = ("aten.arange", "aten._to_copy", "aten.masked_fill")


@pytest.mark.slow
@pytest.mark.parametrize("inputs", ["packed positions", "padded"])
def test_under_inductor_the_rewrite_inserts_only_ops_inductor_lowers(tiny, inputs):
    """The graph Inductor lowers after the pass (read by a joint_custom_pre_pass that runs after
    it): every op is one Inductor lowers on this torch, none is spelled as an op that another
    supported torch only decomposes, and the logits equal eager."""
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.lowering import lowerings

    model, input_ids = tiny
    kwargs = dict(input_ids=input_ids)
    if inputs == "packed positions":
        kwargs["position_ids"] = POSITIONS["packed differently per row"]
    else:
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, :5] = 0
        kwargs["attention_mask"] = attention_mask
    seen: list = []
    misa_compile.backend.clear_reports()
    compiled = torch.compile(model, backend="misa", options={
        "active_heads": HEADS, "block_size": 4,
        "joint_custom_pre_pass": lambda graph: seen.extend(
            n.target for n in graph.nodes if n.op == "call_function")})
    with torch.no_grad():
        logits = compiled(**kwargs).logits
        eager = model(**kwargs).logits
    report = misa_compile.backend.last_report()
    assert len(report.rewritten) == LAYERS and not report.refused, str(report)
    misa_ops = [t for t in seen if str(t).startswith("misa.")]
    assert len(misa_ops) >= LAYERS, "the hook must see the rewritten graphs"
    decomposed = select_decomp_table()
    unlowered = {str(t) for t in seen if t in decomposed and t not in lowerings}
    assert not unlowered, unlowered
    spelled = {str(t) for t in seen if str(t).startswith(DECOMPOSED_IN_TORCH_2_11)}
    assert not spelled, spelled
    torch.testing.assert_close(logits, eager, rtol=1e-4, atol=1e-4)
