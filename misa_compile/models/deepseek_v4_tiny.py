"""A tiny, randomly initialised Hugging Face DeepSeek-V4 (`DeepseekV4ForCausalLM`): every layer is
compressed sparse attention, whose lightning indexer scores the queries against compressed keys
(one per `compress_rate` tokens) and keeps `index_topk` of them. Its q goes view -> transpose ->
RoPE -> transpose back before the q.k product. Small enough to compile on two CPU cores in seconds.

transformers is imported only when a model is built (DeepSeek-V4 needs transformers 5.23 or
newer)."""
from __future__ import annotations

from typing import Any

import torch

from .deepseek_v32_tiny import _check_overrides, _import_model_classes

# Every piece present but small: two hyper-connection streams, MoE with four experts, compressed
# sparse attention over pairs of tokens (so a 32-token prompt has 16 compressed keys).
_TINY_V4_CONFIG: dict[str, Any] = dict(
    vocab_size=96, hidden_size=32, moe_intermediate_size=16, num_attention_heads=2,
    num_key_value_heads=1, head_dim=16, q_lora_rank=16, num_experts_per_tok=2,
    n_routed_experts=4, n_shared_experts=1, max_position_embeddings=512, sliding_window=8,
    o_groups=1, o_lora_rank=16, index_head_dim=16, hc_mult=2, initializer_range=0.2,
    partial_rotary_factor=0.5, use_cache=False,
    compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 8},
)


def tiny_deepseek_v4(layers: int = 2, index_heads: int = 8, index_topk: int = 4, seed: int = 0,
                     *, sequence_length: int = 32, batch_size: int = 1,
                     **overrides: Any) -> tuple[torch.nn.Module, torch.Tensor]:
    """(model in eval mode, example input_ids [batch_size, sequence_length]); the arguments mean
    what they mean for tiny_deepseek_v32, except that index_topk counts compressed keys
    (sequence_length / 2 of them). overrides: any other DeepseekV4Config field."""
    for name, value in (("layers", layers), ("index_heads", index_heads),
                        ("index_topk", index_topk), ("sequence_length", sequence_length),
                        ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"tiny_deepseek_v4: {name}={value!r}; must be an int >= 1")
    config_cls, model_cls = _import_model_classes("DeepseekV4Config", "DeepseekV4ForCausalLM")
    _check_overrides("tiny_deepseek_v4", config_cls, overrides)
    fields = dict(_TINY_V4_CONFIG, num_hidden_layers=layers, index_n_heads=index_heads,
                  index_topk=index_topk,
                  layer_types=["compressed_sparse_attention"] * layers,
                  mlp_layer_types=["moe"] * layers)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = model_cls._from_config(config_cls(**fields), attn_implementation="eager").eval()
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, fields["vocab_size"], (batch_size, sequence_length),
                              generator=generator)
    return model, input_ids
