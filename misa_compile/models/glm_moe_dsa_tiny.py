"""A tiny, randomly initialised Hugging Face GLM-MoE-DSA (`GlmMoeDsaForCausalLM`, the GLM-5
family): every layer runs its own DSA lightning indexer (interleaved RoPE, its own key
projection), layers after the first use an MoE block. The same tiny sizes as
tiny_deepseek_v32, so the two compile in seconds on two CPU cores.

transformers is imported only when a model is built."""
from __future__ import annotations

from typing import Any

import torch

from .deepseek_v32_tiny import build_tiny_causal_lm


def tiny_glm_moe_dsa(layers: int = 2, index_heads: int = 8, index_topk: int = 8, seed: int = 0,
                     *, sequence_length: int = 32, batch_size: int = 1,
                     **overrides: Any) -> tuple[torch.nn.Module, torch.Tensor]:
    """(model in eval mode, example input_ids [batch_size, sequence_length]); the arguments mean
    what they mean for tiny_deepseek_v32 (overrides: any other GlmMoeDsaConfig field). The
    attention implementation is "eager" (the additive-mask path), the KV cache is off."""
    return build_tiny_causal_lm("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM", "tiny_glm_moe_dsa",
                                layers, index_heads, index_topk, seed, sequence_length,
                                batch_size, overrides)
