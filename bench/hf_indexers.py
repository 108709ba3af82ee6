"""transformers' own DSA indexers, set up for bench_model.py: the configs (production sizes, or
tiny ones for the smoke run), one layer's indexer as the model runs it in prefill, the q/k/w it
scores, and a short DeepseekV32ForCausalLM.

Only transformers APIs present from 5.17 on are used: the config classes with `rope_parameters`,
`config._attn_implementation`, `masking_utils.create_causal_mask` called with the keywords the
models' own forward passes use, the modeling modules' indexer / rotary classes and rope helpers,
and `PreTrainedModel._from_config(config, attn_implementation=, dtype=)`."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

import misa_compile  # noqa: F401  (keeps the repository's kernels/ from shadowing HF's)

# DeepSeek-V3.2's published config: rope_scaling {"type": "yarn", "factor": 40,
# "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
# "mscale_all_dim": 1.0}, rope_theta 10000; the class defaults carry every other size.
DEEPSEEK_V32_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                     "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                     "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}

# Every piece present, sizes small enough for a CPU run in seconds.
_SMOKE_SIZES = dict(hidden_size=64, q_lora_rank=32, index_n_heads=8, index_head_dim=32,
                    qk_rope_head_dim=16, index_topk=16, vocab_size=128, intermediate_size=64,
                    moe_intermediate_size=16, num_attention_heads=2, num_key_value_heads=2,
                    kv_lora_rank=16, qk_nope_head_dim=16, v_head_dim=16,
                    max_position_embeddings=4096)


@dataclass(frozen=True)
class IndexerFamily:
    """One model family with a lightning indexer, as transformers names its pieces."""

    label: str
    module: str                    # transformers.models.<module>
    config_class: str
    indexer_class: str
    rotary_class: str
    rope_function: str             # the rope helper the indexer's forward applies
    production: dict = field(default_factory=dict)   # fields set on top of the class defaults

    def modeling(self):
        return self._import(f"modeling_{self.module}")

    def _import(self, name: str):
        return importlib.import_module(f"transformers.models.{self.module}.{name}")

    def config(self, smoke: bool, **fields: Any):
        """The family's config: class defaults (production sizes) plus `production`, or tiny sizes
        when `smoke`; always batch prefill with the sdpa attention (a bool mask)."""
        configuration = self._import(f"configuration_{self.module}")
        sizes = dict(_SMOKE_SIZES) if smoke else {}
        config = getattr(configuration, self.config_class)(
            **dict(self.production, **sizes, use_cache=False, **fields))
        config._attn_implementation = "sdpa"
        return config


DEEPSEEK_V32 = IndexerFamily("DeepSeek-V3.2", "deepseek_v32", "DeepseekV32Config",
                             "DeepseekV32Indexer", "DeepseekV32RotaryEmbedding",
                             "apply_rotary_pos_emb", dict(rope_parameters=DEEPSEEK_V32_YARN))
# GLM-5 (GlmMoeDsaConfig's defaults: hidden 6144, q_lora_rank 2048, 32 index heads x 128,
# index_topk 2048, the class's default rope); its indexer applies interleaved rope.
GLM_MOE_DSA = IndexerFamily("GLM-5 (GLM-MoE-DSA)", "glm_moe_dsa", "GlmMoeDsaConfig",
                            "GlmMoeDsaIndexer", "GlmMoeDsaRotaryEmbedding",
                            "apply_rotary_pos_emb_interleave")


def transformers_version() -> str:
    import transformers
    return transformers.__version__


def describe(config) -> dict:
    """The sizes that decide the indexer's cost, for the output."""
    return dict(hidden=config.hidden_size, q_lora_rank=config.q_lora_rank,
                index_heads=config.index_n_heads, index_head_dim=config.index_head_dim,
                index_topk=config.index_topk, rope=dict(config.rope_parameters))


class IndexerPrefill(nn.Module):
    """One layer's indexer in the model's batch prefill: the model builds the causal mask
    (create_causal_mask, never skipped, as its forward asks) and the rotary position embeddings,
    and the attention hands the indexer mask[:, 0] with its own inputs. Mask and rotary are built
    once per forward in the model and shared by its layers; they are inside this module so that a
    compiled graph sees the mask's construction exactly as in the compiled model.
    forward(hidden_states [B,S,hidden], q_resid [B,S,q_lora_rank], position_ids [B,S]) ->
    int32 top-k indices [B,S,index_topk]."""

    def __init__(self, family: IndexerFamily, config):
        super().__init__()
        modeling = family.modeling()
        from transformers.masking_utils import create_causal_mask
        self._create_causal_mask = create_causal_mask
        self.config = config
        self.rotary_emb = getattr(modeling, family.rotary_class)(config)
        self.indexer = getattr(modeling, family.indexer_class)(config, 0)
        self._rope = getattr(modeling, family.rope_function)

    def forward(self, hidden_states: Tensor, q_resid: Tensor, position_ids: Tensor) -> Tensor:
        mask = self._create_causal_mask(config=self.config, inputs_embeds=hidden_states,
                                        attention_mask=None, past_key_values=None,
                                        position_ids=position_ids, allow_is_causal_skip=False)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        return self.indexer(hidden_states, q_resid, position_embeddings, mask[:, 0, :, :],
                            position_ids)

    def scored_inputs(self, hidden_states: Tensor, q_resid: Tensor, position_ids: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """(q [B,S,H,D], k [B,S,D], w [B,S,H] fp32) as the indexer's forward computes them before
        scoring (before its fp32 casts of q and k); scores are then
        Σ_h w·ReLU(q·k)·indexer.softmax_scale."""
        indexer = self.indexer
        batch, seq, _ = hidden_states.shape
        cos, sin = self.rotary_emb(hidden_states, position_ids)
        rope, rest = indexer.qk_rope_head_dim, indexer.head_dim - indexer.qk_rope_head_dim
        q = indexer.wq_b(q_resid).view(batch, seq, indexer.n_heads, indexer.head_dim)
        q_rot, q_pass = torch.split(q, [rope, rest], dim=-1)
        k = indexer.k_norm(indexer.wk(hidden_states)).unsqueeze(2)
        k_rot, k_pass = torch.split(k, [rope, rest], dim=-1)
        q_rot, k_rot = self._rope(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
        q = torch.cat([q_rot, q_pass], dim=-1)
        k = torch.cat([k_rot, k_pass], dim=-1).squeeze(2)
        weights = indexer.weights_proj(hidden_states.to(indexer.weights_proj.weight.dtype))
        return q, k, weights.float() * indexer.n_heads ** -0.5


def build_indexer_prefill(family: IndexerFamily, smoke: bool, device: torch.device,
                          dtype: torch.dtype, seed: int) -> IndexerPrefill:
    """The module with seeded random weights drawn as the model's _init_weights draws them
    (normal(0, initializer_range) for the linears; LayerNorm at ones / zeros). The indexer's
    weights are cast to `dtype`; the rotary module keeps its fp32 inverse frequencies, as in a
    model built with that dtype."""
    torch.manual_seed(seed)
    module = IndexerPrefill(family, family.config(smoke, num_hidden_layers=1))
    for linear in module.modules():
        if isinstance(linear, nn.Linear):
            nn.init.normal_(linear.weight, std=module.config.initializer_range)
    module.indexer.to(dtype)
    return module.to(device).eval()


def decoder_inputs(config, length: int, device: torch.device, dtype: torch.dtype, seed: int
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """(hidden_states, q_resid, position_ids) of a batch-1 prefill of `length` tokens. Both tensors
    leave an RMSNorm with unit weight in the model (input_layernorm, q_a_layernorm), so their
    entries are drawn from N(0, 1)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(1, length, config.hidden_size, generator=generator, device=device)
    q_resid = torch.randn(1, length, config.q_lora_rank, generator=generator, device=device)
    position_ids = torch.arange(length, device=device)[None]
    return hidden.to(dtype), q_resid.to(dtype), position_ids


@dataclass(frozen=True)
class ShortModel:
    """A DeepseekV32ForCausalLM with few layers, and what differs from the production model."""

    model: nn.Module
    config: Any
    shrunk: str


def prefill_logits(model: Callable, input_ids: Tensor) -> Tensor:
    """The prefill call of generation: no cache, logits of the last position only."""
    return model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits


def build_short_deepseek(layers: int, smoke: bool, device: torch.device, dtype: torch.dtype,
                         seed: int) -> ShortModel:
    """DeepseekV32ForCausalLM at production size except for its depth (1 to 3 layers): each layer
    is then one of DeepSeek-V3.2's three leading dense-MLP layers, so no MoE block is built;
    attention (MLA, 128 heads), indexer, embeddings and vocabulary are production-sized."""
    if not 1 <= layers <= 3:
        raise ValueError(f"build_short_deepseek: layers={layers}; must be 1 to 3 (the model's "
                         "dense-MLP layers: deeper ones hold 256 MoE experts each)")
    family = DEEPSEEK_V32
    config = family.config(smoke, num_hidden_layers=layers)
    modeling = family.modeling()
    torch.manual_seed(seed)
    with torch.device(device):
        model = modeling.DeepseekV32ForCausalLM._from_config(
            config, attn_implementation="sdpa", dtype=dtype).eval()
    shrunk = ("tiny smoke sizes" if smoke else
              f"num_hidden_layers {layers} of 61; DeepSeek-V3.2's first 3 layers use a dense MLP, "
              f"so these {layers} build no MoE experts; MLA attention (128 heads), indexer, "
              "embeddings and vocabulary production-sized; logits of the last position only")
    return ShortModel(model, config, shrunk)
