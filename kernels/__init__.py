"""misa kernels: the custom ops (torch.ops.misa.*), their torch references and implementations.
Importing this package registers the ops."""
from . import ops  # noqa: F401  (registers torch.ops.misa.*)
from . import paged  # noqa: F401  (registers misa.paged_decode_topk, misa.paged_pooled_keys)
from . import triton as _triton  # noqa: F401  (CUDA impls; registered only with CUDA + Triton)
from .indexer import indexer_topk

__all__ = ["indexer_topk", "ops"]
