"""Every lightning-indexer model family of the installed transformers, built tiny and compiled
whole with backend="misa": each layer's indexer is rewritten; with active heads = all heads the
logits equal eager's, with one active head they differ (so the misa ops are seen running)."""
from __future__ import annotations

import functools

import pytest
import torch

import misa_compile
from misa_compile.models import tiny_deepseek_v4, tiny_deepseek_v32, tiny_glm_moe_dsa
from misa_compile.models.deepseek_v32_tiny import build_tiny_causal_lm

LAYERS, HEADS = 2, 8


def _tiny(config_name: str, model_name: str, *, layers, index_heads, index_topk,
          sequence_length, batch_size, **overrides):
    """A family whose config takes DeepSeek-V3.2's field names, at tiny_deepseek_v32's sizes."""
    return build_tiny_causal_lm(config_name, model_name, model_name, layers, index_heads,
                                index_topk, 0, sequence_length, batch_size, overrides)


_TOKEN_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

# factory, index_topk (below the keys each query sees, so the indexer really prunes), whether the
# model takes a padding attention_mask
FAMILIES = {
    "deepseek_v32": (tiny_deepseek_v32, 8, True),
    "glm_moe_dsa": (tiny_glm_moe_dsa, 8, True),
    "deepseek_v4": (tiny_deepseek_v4, 4, False),
    "axk2": (functools.partial(_tiny, "AXK2Config", "AXK2ForCausalLM"), 8, True),
    # Its default special token ids lie outside the tiny vocabulary.
    "hy_v4": (functools.partial(_tiny, "HYV4Config", "HYV4ForCausalLM", **_TOKEN_IDS), 8, True),
    # The text part of a multimodal model (its text config and causal LM).
    "dots3_note": (functools.partial(_tiny, "Dots3NoteTextConfig", "Dots3NoteForCausalLM",
                                     **_TOKEN_IDS), 8, True),
    # Ships no text-only causal LM: the text model, compared by its last hidden state.
    "mistral_large4": (functools.partial(_tiny, "MistralLarge4TextConfig",
                                         "MistralLarge4TextModel", **_TOKEN_IDS), 8, True),
}


def _model_inputs(family: str):
    factory, topk, padded = FAMILIES[family]
    try:
        model, input_ids = factory(layers=LAYERS, index_heads=HEADS, index_topk=topk,
                                   sequence_length=24, batch_size=2)
    except ImportError as error:  # a family newer than the installed transformers
        pytest.skip(str(error))
    inputs = dict(input_ids=input_ids)
    if padded:
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, :5] = 0  # the second prompt left-padded
        inputs["attention_mask"] = attention_mask
    return model, inputs, topk


def _logits(output):
    """A causal LM's logits, or a text model's last hidden state."""
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def _compiled_logits(model, inputs, active_heads):
    torch._dynamo.reset()
    options = dict(variant="misa", active_heads=active_heads, block_size=4, target="aot_eager")
    with torch.no_grad():
        logits = _logits(torch.compile(model, backend="misa", options=options)(**inputs))
    return logits, misa_compile.backend.last_report()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_indexer_family_is_rewritten_and_equals_eager_with_all_heads(family):
    model, inputs, topk = _model_inputs(family)
    with torch.no_grad():
        expected = _logits(model(**inputs))
    logits, report = _compiled_logits(model, inputs, HEADS)
    assert [(r.status, r.heads, r.k_top) for r in report.sites] \
        == [("rewritten", HEADS, topk)] * LAYERS, str(report)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    routed, report = _compiled_logits(model, inputs, 1)
    assert len(report.rewritten) == LAYERS, str(report)
    assert not torch.allclose(routed, expected, rtol=1e-4, atol=1e-4), \
        "one active head selected what all heads select: the routed op did not run"
