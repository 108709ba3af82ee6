"""Model factories for the `misa export` command tests: MODULE:FACTORY targets that return
(model, example_args)."""
from __future__ import annotations

import torch

from ..passes.indexer_zoo import HostSpec, IndexerSpec, build_host, make_inputs


def indexer_host(heads: int = 4, queries: int = 6, keys: int = 10):
    """A zoo host with one DSA indexer (matmul spelling, boolean mask, values and indices out; an
    additive mask read from an input is not proven to hide keys with -inf only, so a site whose
    values are used under it is refused)."""
    host = HostSpec(sites=(IndexerSpec(qk="matmul", head_sum="matmul_weights", scale="hf",
                                       mask="bool_masked_fill", outputs="both", heads=heads,
                                       k_top=3),))
    return build_host(host), make_inputs(host, queries=queries, keys=keys)


def model_without_inputs():
    """Wrong on purpose: a model alone, not (model, example_args)."""
    return torch.nn.Linear(2, 2)


def hf_deepseek_v32(layers: int = 1, sequence_length: int = 8):
    """transformers' DeepseekV32ForCausalLM built directly, as a user's own factory file kept in
    the repository would: `import transformers` runs with the repository root on sys.path."""
    import transformers

    from misa_compile.models.deepseek_v32_tiny import _TINY_CONFIG

    config = transformers.DeepseekV32Config(**dict(_TINY_CONFIG, num_hidden_layers=layers,
                                                   index_n_heads=4, index_topk=4))
    torch.manual_seed(0)
    model = transformers.DeepseekV32ForCausalLM._from_config(
        config, attn_implementation="eager").eval()
    return model, torch.randint(0, config.vocab_size, (1, sequence_length))


def factory_that_raises(size: int = 3):
    """A factory whose own code fails, as a user's may."""
    raise ValueError(f"size={size} is not supported by this model")
