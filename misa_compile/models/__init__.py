"""Small models with DSA lightning indexers, used by the tests, the export path, the evaluation and
the README: a tiny random Hugging Face DeepSeek-V3.2 (transformers is imported only when it is
built) and hand-written indexers in other people's spellings."""
from .deepseek_v32_tiny import tiny_deepseek_v32
from .reference_indexers import DeepSeekReferenceBlock, PackedSparseAttentionBlock

__all__ = ["tiny_deepseek_v32", "DeepSeekReferenceBlock", "PackedSparseAttentionBlock"]
