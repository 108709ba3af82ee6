"""Keep this project's kernels/ source folder from answering `import kernels`.

Python run from a checkout's root (`python -c`, `python -m pytest`, `misa export` with a factory
kept there) has the root on sys.path, so the top-level name `kernels` finds the project's kernels/
folder. That folder is only importable as misa_compile.kernels (its relative imports reach into
misa_compile), so importing it as `kernels` fails. Hugging Face transformers probes for its
optional `kernels` package by that name (`importlib.util.find_spec("kernels")`, then an import)
and every model class then fails to load.

`install()` wraps the import finder of every sys.path directory holding the project's kernels/
folder (existing entries and any added later) so that it does not offer the name `kernels`; all
other names are found there as before. The search then goes on along sys.path, so an installed
Hugging Face `kernels` package is still found, and without one `find_spec("kernels")` is None,
exactly as outside the checkout."""
from __future__ import annotations

import os
import pkgutil
import sys
from pathlib import Path
from typing import Iterable

SHADOWED_NAME = "kernels"


class _FinderWithoutKernels:
    """The path-entry finder of one directory, minus the top-level name `kernels`."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def find_spec(self, fullname: str, target=None):
        if fullname == SHADOWED_NAME:
            return None
        return self._inner.find_spec(fullname, target)

    def invalidate_caches(self) -> None:
        if hasattr(self._inner, "invalidate_caches"):
            self._inner.invalidate_caches()

    def iter_modules(self, prefix: str = ""):
        # pkgutil (help("modules"), walk_packages) lists a directory through its finder.
        for name, is_package in pkgutil.iter_importer_modules(self._inner, prefix):
            if name != prefix + SHADOWED_NAME:
                yield name, is_package


class _Guard:
    """A sys.path_hooks entry: for directories holding one of `own_dirs`, the finder the other
    hooks would make, wrapped; for any other path it declines (ImportError), as hooks do."""

    def __init__(self, own_dirs: frozenset[Path]) -> None:
        self.own_dirs = own_dirs

    def shadows(self, entry: str) -> bool:
        candidate = Path(entry or os.getcwd()) / SHADOWED_NAME
        try:
            return candidate.is_dir() and candidate.resolve() in self.own_dirs
        except OSError:
            return False

    def __call__(self, entry: str):
        if not self.shadows(entry):
            raise ImportError("not a directory holding misa-compile's kernels/ folder")
        for hook in sys.path_hooks:
            if hook is self:
                continue
            try:
                return _FinderWithoutKernels(hook(entry))
            except ImportError:
                continue
        raise ImportError(f"no import hook accepts {entry!r}")


def install(kernel_dirs: Iterable[str]) -> None:
    """Hide `kernel_dirs` (misa_compile.kernels.__path__) from the top-level name `kernels`.
    Idempotent; a `kernels` module already imported is left alone."""
    own_dirs = frozenset(Path(path).resolve() for path in kernel_dirs if os.path.isdir(path))
    if any(isinstance(hook, _Guard) for hook in sys.path_hooks) or not own_dirs:
        return
    guard = _Guard(own_dirs)
    # First, so that directories met from now on (sys.path entries added later, caches cleared
    # by importlib.invalidate_caches()) get the wrapped finder.
    sys.path_hooks.insert(0, guard)
    # Directories already searched keep their finder in sys.path_importer_cache (keyed by the
    # absolute path; "" stands for the current directory): wrap those in place.
    for key, finder in list(sys.path_importer_cache.items()):
        if finder is not None and not isinstance(finder, _FinderWithoutKernels) \
                and guard.shadows(key):
            sys.path_importer_cache[key] = _FinderWithoutKernels(finder)
