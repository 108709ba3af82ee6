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
    # Pools keys in pairs (index_kpool=2) and scores the pools: index_topk=8 keeps 8 // 2 = 4.
    "glm5_next": (functools.partial(_tiny, "Glm5NextTextConfig", "Glm5NextTextModel",
                                    index_kpool=2, qk_rope_head_dim=0, qk_nope_head_dim=16,
                                    layer_types=["indexed_attention"] * LAYERS, **_TOKEN_IDS),
                  8, True),
}

# Sites per family when not one per layer, and the top-k each site keeps when not index_topk.
# glm5_next: a graph break (boolean indexing in get_pooled_states) ends the indexer's graph, and
# the resumed frame of Glm5NextTextIndexer.forward that holds the top-k is compiled once and
# then run by both layers' indexers (its guards do not depend on which layer's module it is):
# one compiled site, named after the layer that compiled it, whose misa ops run once per layer.
_SITES = {"glm5_next": 1}
_KTOP = {"glm5_next": 4}

# Families that ship an indexer which is not a DSA lightning indexer: with their sparse layers
# enabled, no site is reported (a top-k without q.k -> ReLU -> weighted head sum below it is not
# indexer-like) and the compiled model equals eager.
# * qwen4_exp (QSA): a Python loop per batch row and query, keys pooled per query over that
#   query's own visible tokens (torch.nonzero), ReLU(q.k) summed over heads without per-head
#   weights, top-k over blocks along dim 0; no shared key set, no weights, no query axis.
# * minimax_m3_vl: one selection per indexer head (no head reduction), no ReLU, keys max-pooled
#   into blocks, local blocks forced in with +inf.
# Two more families name an indexer but build none, so there is nothing to compile: longcat_flash
# (its MLA subclasses DeepSeek-V3.2's attention and deletes the indexer) and step3p7 (its config
# maps MiniMax-M3 sparse "Lightning Indexer" fields, but Step3p7Attention never reads them).
NOT_INDEXERS = {
    "qwen4_exp": functools.partial(
        _tiny, "Qwen4ExpTextConfig", "Qwen4ExpTextModel", layer_types=["indexed_attention"] * 2,
        indexer_n_heads=8, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8,
        indexer_compress_ratio=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
        linear_num_value_heads=2, hc_lowrank=8, shared_expert_intermediate_size=16, **_TOKEN_IDS),
    "minimax_m3_vl": functools.partial(
        _tiny, "MiniMaxM3VLTextConfig", "MiniMaxM3VLTextModel",
        layer_types=["minimax_m3_sparse"] * 2, index_n_heads=2, index_head_dim=16,
        index_block_size=2, index_topk_blocks=2, index_local_blocks=1, head_dim=16,
        num_local_experts=4, num_experts_per_tok=2, rotary_dim=8, dense_intermediate_size=32,
        shared_intermediate_size=16, **_TOKEN_IDS),
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
    sites = _SITES.get(family, LAYERS)
    assert [(r.status, r.heads, r.k_top) for r in report.sites] \
        == [("rewritten", HEADS, _KTOP.get(family, topk))] * sites, str(report)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    routed, report = _compiled_logits(model, inputs, 1)
    assert len(report.rewritten) == sites, str(report)
    assert not torch.allclose(routed, expected, rtol=1e-4, atol=1e-4), \
        "one active head selected what all heads select: the routed op did not run"


def test_glm5_next_one_compiled_site_runs_for_every_layer(monkeypatch):
    """The single reported glm5_next site is one compiled graph that both layers run."""
    from misa_compile.kernels import ops

    calls = []
    implementation = ops._implementation

    def counted(name, device):
        run = implementation(name, device)

        def call(*args):
            calls.append(name)
            return run(*args)
        return call

    monkeypatch.setattr(ops, "_implementation", counted)
    model, inputs, _ = _model_inputs("glm5_next")
    _, report = _compiled_logits(model, inputs, 1)
    assert len(report.rewritten) == 1, str(report)
    assert calls.count("routed_topk") == LAYERS, calls


@pytest.mark.parametrize("family", list(NOT_INDEXERS))
def test_family_without_a_dsa_lightning_indexer_is_not_reported(family):
    model, input_ids = NOT_INDEXERS[family](layers=LAYERS, index_heads=HEADS, index_topk=8,
                                            sequence_length=12, batch_size=1)
    assert all(getattr(layer.self_attn, "indexer", None) is not None for layer in model.layers)
    with torch.no_grad():
        expected = _logits(model(input_ids=input_ids))
    logits, report = _compiled_logits(model, dict(input_ids=input_ids), HEADS)
    assert report.sites == [], str(report)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
