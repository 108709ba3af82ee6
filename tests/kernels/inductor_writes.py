"""What Inductor's analysis of each Triton kernel says the kernel writes, for every launch the GPU
launchers make (recorded on CPU tensors by sm90_builds.record_launches, compiled to TTIR for an
H100). Inductor orders and functionalises the kernels of a traced op by that analysis, and when
it cannot analyse a kernel (a non-pure inline asm, say) it assumes that every input is written,
which clones inputs. Prints one JSON line per kernel variant: the arguments written, and whether
the analysis gave up.

    env -u TRITON_INTERPRET python tests/kernels/inductor_writes.py"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from unittest import mock

import triton
from triton.runtime.autotuner import Autotuner
from torch._higher_order_ops import triton_kernel_wrap

sys.path.insert(0, str(Path(__file__).parent))
import sm90_builds  # noqa: E402


class H100Driver:
    """Stands in for the GPU driver: the TTIR is generated for an H100 on a machine without one."""

    def get_current_target(self):
        return sm90_builds.H100


class GaveUp(logging.Handler):
    """Catches the analysis' warning that it fell back to 'every input is written'."""

    def __init__(self):
        super().__init__()
        self.seen = False

    def emit(self, record):
        self.seen = self.seen or "assuming every input is mutated" in record.getMessage()


def written(kernel, named: dict) -> list[str]:
    """The argument names the analysis marks written (torch 2.13 reports accesses, 2.11 only
    the mutated names)."""
    if hasattr(triton_kernel_wrap, "identify_accessed_tensors"):
        accesses = triton_kernel_wrap.identify_accessed_tensors(kernel, named, {})
        return sorted(str(dep.name) for dep in accesses.read_writes.writes)
    return sorted(triton_kernel_wrap.identify_mutated_tensors(kernel, named, {}))


def main():
    handler = GaveUp()
    # The module logs through its own logger (torch._dynamo's in torch 2.11-2.13).
    logger = getattr(triton_kernel_wrap, "log", logging.getLogger(triton_kernel_wrap.__name__))
    logger.addHandler(handler)
    seen = set()
    driver = H100Driver()
    with mock.patch.object(triton.runtime.driver, "_active", driver), \
            mock.patch.object(triton.runtime.driver, "_default", driver):
        for kernel, args, kwargs in sm90_builds.record_launches():
            fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
            named = dict(zip(fn.arg_names, args), **kwargs)
            for option in ("num_warps", "num_stages"):
                named.pop(option, None)
            configs = kernel.configs if isinstance(kernel, Autotuner) else [None]
            for config in configs:
                values = dict(named, **(config.kwargs if config else {}))
                key = (fn.__name__, repr(sorted((k, v) for k, v in values.items()
                                                if not hasattr(v, "shape"))))
                if key in seen:
                    continue
                seen.add(key)
                handler.seen = False
                writes = written(kernel, values)
                print(json.dumps(dict(kernel=fn.__name__, writes=writes,
                                      gave_up=handler.seen)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
