"""misa-compile: run the DSA lightning indexers of any PyTorch model as MISA routed indexers."""
from .config import MisaConfig
from . import kernels  # noqa: F401  (registers torch.ops.misa.*)
from . import kernels_shadow
# Run from a checkout's root, the top-level name `kernels` would find the project's kernels/
# folder, which breaks transformers' probe for Hugging Face's `kernels` package.
kernels_shadow.install(kernels.__path__)
from .kernels import indexer_topk
from .kernels.validation import debug_checks
# Imported eagerly: the function `export` shares its name with the module misa_compile.export,
# and a lazy attribute would be shadowed by the module as soon as anything imported it.
from .export import export, load, package_aoti
# Eager for the same reason: `explain` is also the name of the module misa_compile.explain.
from .explain import explain
from .report import SiteReport

__version__ = "0.1.0"
__all__ = ["MisaConfig", "SiteReport", "explain", "indexer_topk", "export", "load", "package_aoti",
           "to_onnx", "debug_checks", "__version__"]


def __getattr__(name: str):
    # onnx and onnxscript are imported only by users of the ONNX export.
    if name == "to_onnx":
        from .onnx_export import to_onnx
        return to_onnx
    raise AttributeError(f"module 'misa_compile' has no attribute {name!r}")
