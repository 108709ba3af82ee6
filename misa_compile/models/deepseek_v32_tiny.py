"""A tiny, randomly initialised Hugging Face DeepSeek-V3.2 (`DeepseekV32ForCausalLM`): every layer
has a DSA lightning indexer, and layers after the first use an MoE block whose gate takes its own,
unrelated top-ks. Small enough to compile on two CPU cores in seconds.

transformers is imported only when a model is built, so the rest of misa-compile works without it."""
from __future__ import annotations

import difflib
import inspect
import sys
from typing import Any

import torch

# Sized so that every piece exists but stays small: q/kv LoRA ranks, rope and nope dims, MoE with
# two expert groups (so the gate runs its group top-k as well as its expert top-k).
_TINY_CONFIG: dict[str, Any] = dict(
    vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
    num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=16,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, index_head_dim=16,
    n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
    first_k_dense_replace=1, max_position_embeddings=512, initializer_range=0.2,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, use_cache=False,
)


def tiny_deepseek_v32(layers: int = 2, index_heads: int = 8, index_topk: int = 8, seed: int = 0,
                      *, sequence_length: int = 32, batch_size: int = 1,
                      **overrides: Any) -> tuple[torch.nn.Module, torch.Tensor]:
    """(model in eval mode, example input_ids [batch_size, sequence_length]).

    layers:       decoder layers (each has an indexer); layer 0 has a dense MLP, the rest MoE.
    index_heads:  H of the indexer (`index_n_heads`).
    index_topk:   keys the indexer keeps per query; below `sequence_length` it really prunes.
    seed:         seeds the weights and the example ids.
    overrides:    any other DeepseekV32Config field (e.g. index_head_dim=32).
    The attention implementation is "eager" (the additive-mask path), the KV cache is off."""
    return build_tiny_causal_lm("DeepseekV32Config", "DeepseekV32ForCausalLM", "tiny_deepseek_v32",
                                layers, index_heads, index_topk, seed, sequence_length,
                                batch_size, overrides)


def build_tiny_causal_lm(config_name: str, model_name: str, factory: str, layers: int,
                         index_heads: int, index_topk: int, seed: int, sequence_length: int,
                         batch_size: int, overrides: dict[str, Any]
                         ) -> tuple[torch.nn.Module, torch.Tensor]:
    """A transformers DSA model (`model_name` with `config_name`) sized by _TINY_CONFIG, eager
    attention, and example input_ids; `factory` names the caller in errors."""
    for name, value, minimum in (("layers", layers, 1), ("index_heads", index_heads, 1),
                                 ("index_topk", index_topk, 1),
                                 ("sequence_length", sequence_length, 1),
                                 ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{factory}: {name}={value!r}; must be an int >= {minimum}")
    config_cls, model_cls = _import_model_classes(config_name, model_name)
    _check_overrides(factory, config_cls, overrides)
    fields = dict(_TINY_CONFIG, num_hidden_layers=layers, index_n_heads=index_heads,
                  index_topk=index_topk)
    fields.update(overrides)
    config = config_cls(**fields)
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation="eager").eval()
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (batch_size, sequence_length),
                              generator=generator)
    return model, input_ids


# Accepted by every transformers config (PreTrainedConfig pops it from its keyword arguments)
# though it is not a field: how MoE experts run, e.g. "batched_mm", which ONNX export needs.
_CONFIG_KEYWORDS = ("experts_implementation",)
_FACTORY_ARGUMENTS = ("layers", "index_heads", "index_topk", "seed", "sequence_length",
                      "batch_size")


def _check_overrides(factory: str, config_cls: type, overrides: dict[str, Any]) -> None:
    """transformers configs keep unknown keyword arguments as attributes without a word, so a
    misspelt factory argument (layer=4) would silently build the defaults: refuse it."""
    fields = [name for name, parameter in inspect.signature(config_cls).parameters.items()
              if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)]
    valid = [*_FACTORY_ARGUMENTS, *_CONFIG_KEYWORDS, *fields]
    unknown = [name for name in overrides if name not in valid]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, valid, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise TypeError(
        f"{factory}: unknown argument {', '.join(hints)}; valid: {', '.join(_FACTORY_ARGUMENTS)}, "
        f"{', '.join(_CONFIG_KEYWORDS)}, or a {config_cls.__name__} field: {', '.join(fields)}")


def _import_model_classes(config_name: str, model_name: str) -> tuple[type, type]:
    # Importing misa_compile (this package's parent) already keeps the project's kernels/ folder
    # from answering transformers' probe for the `kernels` package (misa_compile/kernels_shadow.py).
    try:
        import transformers
        config_cls = getattr(transformers, config_name)
        model_cls = getattr(transformers, model_name)
    except (ImportError, AttributeError) as error:
        version = getattr(sys.modules.get("transformers"), "__version__", "not installed")
        raise ImportError(
            f"{model_name} needs Hugging Face transformers 5.17 or newer (found: {version}): "
            "pip install 'transformers>=5.17'") from error
    return config_cls, model_cls

