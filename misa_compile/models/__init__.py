"""Small models with DSA lightning indexers, used by the tests, the export path, the evaluation and
the README: tiny random Hugging Face DeepSeek-V3.2, DeepSeek-V4 and GLM-MoE-DSA models (transformers is
imported only when one is built) and hand-written indexers in other people's spellings."""
from .deepseek_v32_tiny import tiny_deepseek_v32
from .deepseek_v4_tiny import tiny_deepseek_v4
from .glm_moe_dsa_tiny import tiny_glm_moe_dsa
from .reference_indexers import DeepSeekReferenceBlock, PackedSparseAttentionBlock

__all__ = ["tiny_deepseek_v32", "tiny_deepseek_v4", "tiny_glm_moe_dsa", "DeepSeekReferenceBlock",
           "PackedSparseAttentionBlock"]
