"""Runs an AOTInductor package in a fresh Python process that never imports misa_compile: the
way a server without the project would run it. Shared by the CPU tests here and tests/gpu."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

# The child asserts, after loading and running the package, that nothing of this project was
# imported (misa_compile, or the top-level kernels folder) and that no misa op is registered: the
# package must hold its own code for every indexer op.
_CHILD = """
import sys
import torch
{imports}
package, inputs, outputs = sys.argv[1:4]
compiled = torch._inductor.aoti_load_package(package)
with torch.no_grad():
    result = compiled(*torch.load(inputs))
leaves = [leaf for leaf in torch.utils._pytree.tree_leaves(result)
          if isinstance(leaf, torch.Tensor)]
torch.save([leaf.cpu() for leaf in leaves], outputs)
ours = sorted(name for name in sys.modules if name.split(".")[0] in ("misa_compile", "kernels"))
assert not ours, f"running the package imported {{ours}}"
misa_ops = [name for name in torch._C._dispatch_get_all_op_names() if name.startswith("misa::")]
assert not misa_ops, f"misa ops are registered: {{misa_ops}}"
"""


def run_package(package: Path, inputs: tuple[torch.Tensor, ...], workdir: Path,
                imports: str = "", timeout: float = 300) -> list[torch.Tensor]:
    """The tensor outputs (flattened, on the CPU) of the package called with `inputs`, in a child
    process started outside the repository with no PYTHONPATH (so the repository is not on its
    sys.path). `imports` is code run first in the child, e.g. the module of a model's output
    type, which the package's output structure names."""
    workdir = Path(workdir).resolve()
    assert REPO not in (workdir, *workdir.parents), "run the package outside the repository"
    inputs_path, outputs_path = workdir / "inputs.pt", workdir / "outputs.pt"
    torch.save(tuple(inputs), inputs_path)
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("PYTHON") and name != "TRITON_INTERPRET"}
    done = subprocess.run(
        # faulthandler: a crash inside the package's native code still leaves a trace.
        [sys.executable, "-X", "faulthandler", "-c",
         _CHILD.format(imports=textwrap.dedent(imports)), str(package), str(inputs_path),
         str(outputs_path)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (f"the package's process exited with {done.returncode}\n"
                                  f"stdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-4000:]}")
    return torch.load(outputs_path)
