"""misa-compile: run the DSA lightning indexers of any PyTorch model as MISA routed indexers."""
from .config import MisaConfig
from . import kernels  # noqa: F401  (registers torch.ops.misa.*)
from .kernels import indexer_topk

__version__ = "0.1.0"
__all__ = ["MisaConfig", "indexer_topk", "__version__"]
