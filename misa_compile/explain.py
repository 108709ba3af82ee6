"""`misa_compile.explain(model, *args)`: which indexer sites the misa backend finds in a model and
what it does with each, without generating code."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch

from .backend import compile_graph
from .config import MisaConfig
from .report import SiteReport


def explain(fn_or_module: Callable, *args: Any, options: Optional[Mapping[str, Any]] = None,
            **kwargs: Any) -> SiteReport:
    """Compiles `fn_or_module` with the misa backend's debug target ("aot_eager": the same passes,
    no Inductor code generation), runs it once on (*args, **kwargs) and returns the merged site
    report of every graph Dynamo produced. Nothing is printed: `print(report)` shows the table.

    options: the MisaConfig fields (e.g. {"active_heads": 8}); a "target" entry is ignored, the
    report does not depend on it."""
    config, rest = MisaConfig.from_options(options)
    rest.pop("target", None)
    if rest:
        raise ValueError(f"explain: unknown options {sorted(rest)}; allowed: the MisaConfig "
                         "fields and 'target'")
    reports: list[SiteReport] = []

    def backend(gm, example_inputs):
        return compile_graph(gm, example_inputs, config, "aot_eager", {}, None, reports.append)

    torch.compile(fn_or_module, backend=backend)(*args, **kwargs)
    return SiteReport.merged(reports)
