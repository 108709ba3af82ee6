"""The names of the project's Triton kernels. A launched kernel carries its @triton.jit function's
name, so the benchmarks and GPU tests use this set to tell, from a profile or from generated code,
whether a misa op ran the project's kernels or something else (the torch implementation)."""
from __future__ import annotations

import importlib
import pkgutil


def project_triton_kernel_names() -> frozenset[str]:
    """Names of every @triton.jit function under kernels/triton, subpackages included
    (autotuners and heuristics wrap the JIT function in .fn, possibly several times)."""
    from triton.runtime.jit import JITFunction

    names = set()
    package = importlib.import_module(__package__)
    for info in pkgutil.walk_packages(package.__path__, prefix=__package__ + "."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            while not isinstance(value, JITFunction) and hasattr(value, "fn"):
                value = value.fn
            if isinstance(value, JITFunction):
                names.add(value.fn.__name__)
    return frozenset(names)
