"""The misa graph passes, in the order they run, and their Inductor wrapper.

Every entry point (torch.compile's backend, export, the command line) runs the same list through
run_misa_passes. Each pass takes (graph, MisaConfig, *, python_scalar_inputs), changes the graph in
place, cleans up after itself (dead code, lint, recompile) and returns a SiteReport."""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Callable, Collection, Optional, Union

from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx import Graph, GraphModule

from ..config import MisaConfig
from ..report import SiteReport
from .rewrite_indexers import rewrite_indexer_sites

GraphPass = Callable[..., SiteReport]

MISA_PASSES: tuple[tuple[str, GraphPass], ...] = (
    ("rewrite_indexers", rewrite_indexer_sites),
)


def run_misa_passes(gm: Union[GraphModule, Graph], config: MisaConfig, *,
                    python_scalar_inputs: Collection[int] = (),
                    for_inductor: bool = False) -> SiteReport:
    """Runs every misa pass on `gm` in order; returns their merged report.
    python_scalar_inputs: positions of graph inputs holding a Python number as a 0-d tensor.
    for_inductor: Inductor lowers `gm` next, after its decompositions already ran."""
    return SiteReport.merged(graph_pass(gm, config, python_scalar_inputs=python_scalar_inputs,
                                        for_inductor=for_inductor)
                             for _, graph_pass in MISA_PASSES)


def passes_fingerprint() -> str:
    """A hash of everything that decides what the passes emit: their sources, the op schemas and
    the indexer chain they mirror, the configuration class, and the package version."""
    from .. import __version__

    emitted = ("misa_compile.kernels.ops", "misa_compile.kernels.indexer", "misa_compile.config",
               "misa_compile.distributed.op")
    # Located by module name (not by folder layout), so editable and regular installs agree.
    sources = sorted(Path(__file__).resolve().parent.glob("*.py")) + [
        Path(importlib.util.find_spec(name).origin) for name in emitted]
    digest = hashlib.sha256(__version__.encode())
    for path in sources:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class MisaInductorPass(CustomGraphPass):
    """run_misa_passes as Inductor's joint_custom_pre_pass. The uuid covers the pass sources and
    the configuration, so Inductor's FX graph cache never serves a graph rewritten differently.
    `on_report` receives the report of every graph the pass runs on."""

    def __init__(self, config: MisaConfig, on_report: Callable[[SiteReport], None],
                 then: Optional[Callable[[Graph], None]] = None,
                 python_scalar_inputs: Collection[int] = ()) -> None:
        self.config = config
        self.on_report = on_report
        self.then = then  # a joint_custom_pre_pass the user had configured, run afterwards
        self.python_scalar_inputs = tuple(python_scalar_inputs)

    def __call__(self, graph: Graph) -> None:
        self.on_report(run_misa_passes(graph, self.config,
                                       python_scalar_inputs=self.python_scalar_inputs,
                                       for_inductor=True))
        if self.then is not None:
            self.then(graph)

    def uuid(self) -> Optional[str]:
        then_id = ""
        if self.then is not None:
            then_uuid = getattr(self.then, "uuid", None)
            if then_uuid is None or then_uuid() is None:
                return None  # the user's pass cannot be hashed: no caching, as Inductor does
            then_id = repr(then_uuid())
        text = f"{passes_fingerprint()}|{self.config!r}|{self.python_scalar_inputs}|{then_id}"
        return hashlib.sha256(text.encode()).hexdigest()
