"""The `misa` torch.compile backend: `torch.compile(model, backend="misa", options={...})`.

Registered only through the `torch_dynamo_backends` entry point in pyproject.toml (registering it
here as well would make the name a duplicate). `options` takes the MisaConfig fields
(MisaConfig.from_options) and a "target":

  "inductor"   (default) Inductor, with the misa passes as its joint_custom_pre_pass: they run on
               the functionalised, decomposed ATen graph before Inductor's own patterns. Any other
               option is an Inductor config entry (config_patches).
  "aot_eager"  AOTAutograd, then the rewritten ATen graph runs eagerly: no code generation, for
               tests and for `explain`.
  "tensorrt"   the rewritten ATen graph handed to Torch-TensorRT's backend (the misa ops run in
               PyTorch between TensorRT engines). Needs the torch_tensorrt package.

The site report of each compiled graph is logged on the "misa_compile" logger and kept:
last_report() is the most recent graph's, compiled_reports() all of them."""
from __future__ import annotations

import collections
from typing import Any, Callable, Optional, Sequence

import torch

from .config import MisaConfig
from .report import SiteReport

TARGETS = ("inductor", "aot_eager", "tensorrt")

_REPORTS: collections.deque = collections.deque(maxlen=256)


def misa_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any):
    """Dynamo backend entry point; see the module docstring for `options`."""
    options = kwargs.pop("options", None)
    mode = kwargs.pop("mode", None)
    if kwargs:
        raise TypeError(f"misa backend: unexpected arguments {sorted(kwargs)}; pass settings as "
                        "options={...}")
    config, rest = MisaConfig.from_options(options)
    target = rest.pop("target", "inductor")
    return compile_graph(gm, example_inputs, config, target, rest, mode, _REPORTS.append)


def last_report() -> SiteReport:
    """The site report of the graph the misa backend compiled last (empty if none yet)."""
    return _REPORTS[-1] if _REPORTS else SiteReport()


def compiled_reports() -> list[SiteReport]:
    """The site reports of the graphs compiled since the last clear_reports(), oldest first."""
    return list(_REPORTS)


def clear_reports() -> None:
    _REPORTS.clear()


def compile_graph(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], config: MisaConfig,
                  target: str, extra: dict[str, Any], mode: Optional[str],
                  on_report: Callable[[SiteReport], None]):
    """Compiles one Dynamo graph for `target`; hands the graph's site report to on_report."""
    if target not in TARGETS:
        raise ValueError(f"misa backend: options['target']={target!r}; allowed values are "
                         f"{TARGETS}")
    if target != "inductor" and mode is not None:
        raise ValueError(f"misa backend: mode={mode!r} applies to target='inductor' only")
    if target == "aot_eager":
        if extra:
            raise ValueError(f"misa backend: unknown options {sorted(extra)} for target "
                             "'aot_eager'; allowed: the MisaConfig fields and 'target'")
        return _aot_eager(gm, example_inputs, config, on_report)
    if target == "tensorrt":
        return _tensorrt(gm, example_inputs, config, extra, on_report)
    return _inductor(gm, example_inputs, config, extra, mode, on_report)


def python_scalar_inputs(gm: torch.fx.GraphModule) -> tuple[int, ...]:
    """Positions, among the inputs of the ATen graph AOTAutograd traces from `gm`, of the Python
    numbers Dynamo passes as 0-d tensors (float attributes under dynamic shapes). AOTAutograd
    puts gm's own parameters and buffers first, then gm's inputs in order."""
    offset = len(list(gm.parameters())) + len(list(gm.buffers()))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return tuple(offset + i for i, node in enumerate(placeholders)
                 if getattr(node.meta.get("grapharg"), "pass_arg_as_tensor", False))


def _aot_eager(gm, example_inputs, config, on_report):
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    from .passes.pass_manager import run_misa_passes

    reports: list[SiteReport] = []
    scalars = python_scalar_inputs(gm)

    def rewrite_and_run(graph_module, _inputs):
        reports.append(run_misa_passes(graph_module, config, python_scalar_inputs=scalars))
        return make_boxed_func(graph_module.forward)

    compiled = aot_autograd(fw_compiler=rewrite_and_run)(gm, example_inputs)
    on_report(SiteReport.merged(reports))
    return compiled


def _inductor(gm, example_inputs, config, extra, mode, on_report):
    from torch._inductor import config as inductor_config
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    from .passes.pass_manager import MisaInductorPass

    known = set(inductor_config.get_config_copy())
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ValueError(f"misa backend: unknown options {unknown}; allowed: the MisaConfig "
                         "fields, 'target', and Inductor config entries")
    reports: list[SiteReport] = []
    patches = dict(list_mode_options(mode) if mode else {}, **extra)
    patches["joint_custom_pre_pass"] = MisaInductorPass(
        config, reports.append,
        then=extra.get("joint_custom_pre_pass", inductor_config.joint_custom_pre_pass),
        python_scalar_inputs=python_scalar_inputs(gm))
    compiled = compile_fx(gm, example_inputs, config_patches=patches)
    if not reports:
        # Inductor served the graph from its cache, so the pass did not run: analyse a throwaway
        # ATen trace of the same graph (the rewrite is deterministic) to report what it holds.
        _aot_eager(gm, example_inputs, config, reports.append)
    on_report(SiteReport.merged(reports))
    return compiled


def _tensorrt(gm, example_inputs, config, extra, on_report):
    try:
        import torch_tensorrt  # noqa: F401  (registers the "tensorrt" Dynamo backend)
    except ImportError as error:
        raise ImportError(
            "misa backend: target='tensorrt' needs Torch-TensorRT, but the torch_tensorrt "
            "package is not importable here (pip install torch-tensorrt, built for your torch "
            "and CUDA versions); use target='inductor' or 'aot_eager' otherwise") from error
    from torch._dynamo import lookup_backend
    from torch._dynamo.backends.common import aot_autograd

    from .passes.pass_manager import run_misa_passes

    tensorrt = lookup_backend("tensorrt")
    # Without this Torch-TensorRT silently falls back to eager when an engine fails to build.
    options = dict({"pass_through_build_failures": True}, **extra)
    reports: list[SiteReport] = []
    scalars = python_scalar_inputs(gm)

    def rewrite_then_tensorrt(graph_module, inputs):
        reports.append(run_misa_passes(graph_module, config, python_scalar_inputs=scalars))
        return tensorrt(graph_module, inputs, options=options)

    compiled = aot_autograd(fw_compiler=rewrite_then_tensorrt)(gm, example_inputs)
    on_report(SiteReport.merged(reports))
    return compiled
