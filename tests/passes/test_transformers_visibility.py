"""Whole-model compiles of the tiny transformers DSA models (DeepSeek-V3.2, GLM-MoE-DSA): the
causal mask the model builds from its positions reaches the misa ops as causal=True; a 2-D
padding mask stays a mask next to it; logits equal eager with all heads active."""
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
