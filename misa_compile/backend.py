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

`mode=` (target "inductor") applies Inductor's settings for that mode: "reduce-overhead" turns on
CUDA graphs (triton.cudagraphs), which record and replay the rewritten graphs once the misa ops
run without host synchronisation. torch.compile takes mode or options, not both, so a mode runs
with the default MisaConfig; to choose the config as well, pass the mode's Inductor settings as
options (options={"triton.cudagraphs": True, "active_heads": 16}).

The site report of each compiled graph is logged on the "misa_compile" logger and kept:
last_report() covers every graph of the model compiled last (see its docstring),
compiled_reports() lists every graph's report since clear_reports()."""
from __future__ import annotations

import collections
import dataclasses
import sys
import weakref
from typing import Any, Callable, Optional, Sequence

import torch

from .config import MisaConfig
from .report import SiteReport
from .unapplied import warn_unapplied

TARGETS = ("inductor", "aot_eager", "tensorrt")

_REPORTS: collections.deque = collections.deque(maxlen=256)


class _CompiledModelReports:
    """The reports of the graphs one torch.compile(...) call has compiled: per Dynamo frame (the
    function and each resume function after a graph break), in the order the frames were first
    compiled, the graphs of that frame's latest compile (a recompile replaces the older ones)."""

    def __init__(self, owner: Any) -> None:
        self._owner = _reference(owner)
        self._frames: dict[Any, tuple[Any, list[SiteReport]]] = {}

    def belongs_to(self, owner: Any) -> bool:
        return self._owner() is owner

    def add(self, report: SiteReport) -> None:
        frame, version = _dynamo_frame()
        known = self._frames.get(frame)
        if known is not None and known[0] == version:
            known[1].append(report)
        else:
            self._frames[frame] = (version, [report])

    def merged(self) -> SiteReport:
        return SiteReport.merged(r for _, reports in self._frames.values() for r in reports)


_LAST_MODEL: Optional[_CompiledModelReports] = None


def misa_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any):
    """Dynamo backend entry point; see the module docstring for `options`."""
    options = kwargs.pop("options", None)
    mode = kwargs.pop("mode", None)
    if kwargs:
        raise TypeError(f"misa backend: unexpected arguments {sorted(kwargs)}; pass settings as "
                        "options={...}")
    config, rest = MisaConfig.from_options(options)
    target = rest.pop("target", "inductor")
    model = _model_reports(_torch_compile_call())

    def keep(report: SiteReport) -> None:
        _REPORTS.append(report)
        model.add(report)
        # A setting that could not apply (active_heads above a site's H, ...) is said out loud.
        warn_unapplied(report, whole_model=False)

    return compile_graph(gm, example_inputs, config, target, rest, mode, keep)


def last_report() -> SiteReport:
    """The merged site report of every graph of the model the misa backend compiled last.

    "The model" is one torch.compile(...) call: Dynamo hands the backend one graph per frame it
    compiles (the model's function, and after each graph break a resume function, or a nested
    function it could not inline), all through the one backend object that torch.compile call
    created; the graphs compiled through that object belong together, in the order their frames
    were first compiled, and a recompile of a frame (new shapes, a failed guard) replaces that
    frame's earlier graphs rather than listing its sites twice. A report from another
    torch.compile call starts a new model. Grouping by the compile call rather than by time is
    what keeps the graphs of one model together when eager code runs between them. When the
    backend is called without torch.compile (torch._dynamo.optimize, or directly), each graph is
    its own model. Empty if nothing was compiled since clear_reports()."""
    return _LAST_MODEL.merged() if _LAST_MODEL is not None else SiteReport()


def compiled_reports() -> list[SiteReport]:
    """The site reports of the graphs compiled since the last clear_reports(), oldest first."""
    return list(_REPORTS)


def clear_reports() -> None:
    global _LAST_MODEL
    _REPORTS.clear()
    _LAST_MODEL = None


def _model_reports(owner: Any) -> _CompiledModelReports:
    global _LAST_MODEL
    if _LAST_MODEL is None or not _LAST_MODEL.belongs_to(owner):
        _LAST_MODEL = _CompiledModelReports(owner)
    return _LAST_MODEL


def _torch_compile_call() -> Any:
    """The backend object torch.compile(...) created for this compile (torch._TorchCompileWrapper,
    one per call, which calls this backend), found on the call stack; a fresh object when the
    backend was reached another way."""
    wrapper_call = getattr(getattr(torch, "_TorchCompileWrapper", None), "__call__", None)
    code = getattr(wrapper_call, "__code__", None)
    frame = sys._getframe(1)
    for _ in range(32):
        if frame is None:
            break
        if frame.f_code is code:
            owner = frame.f_locals.get("self")
            if owner is not None:
                return owner
        frame = frame.f_back
    return object()


def _reference(owner: Any) -> Callable[[], Any]:
    """A weak reference where the object allows one, so a finished model is not kept alive."""
    try:
        return weakref.ref(owner)
    except TypeError:
        return lambda: owner


def _dynamo_frame() -> tuple[Any, Any]:
    """(the frame Dynamo is compiling, which compile of that frame this is); a unique key when
    no compile is under way (a report can then never replace another)."""
    from torch._guards import CompileContext

    compile_id = CompileContext.current_compile_id()
    if compile_id is None or compile_id.frame_id is None:
        return object(), None
    return compile_id.frame_id, compile_id.frame_compile_id


def compile_graph(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], config: MisaConfig,
                  target: str, extra: dict[str, Any], mode: Optional[str],
                  on_report: Callable[[SiteReport], None]):
    """Compiles one Dynamo graph for `target`; hands the graph's site report to on_report."""
    on_report = _with_module_prefix(on_report, _compiled_module_path())
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


def _compiled_module_path() -> str:
    """Where, in the model torch.compile was given, the module whose code Dynamo is compiling
    sits ("" for the model itself). Site names carry module paths relative to the compiled
    frame's `self`; a frame Dynamo compiles on its own (a submodule's forward reached after a
    graph break) would otherwise lose its place in the model. Read off the call stack: the
    innermost nn.Module call is the compiled frame's module, the torch.compile'd module
    (OptimizedModule) wraps the root."""
    from torch._dynamo.eval_frame import OptimizedModule

    module_calls = {torch.nn.Module._call_impl.__code__,
                    torch.nn.Module._wrapped_call_impl.__code__}
    inner = None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in module_calls:
            module = frame.f_locals.get("self")
            if isinstance(module, OptimizedModule):
                root = module._orig_mod
                if inner is None or inner is root:
                    return ""
                return next((name for name, m in root.named_modules() if m is inner), "")
            if isinstance(module, torch.nn.Module) and inner is None:
                inner = module
        frame = frame.f_back
    return ""


def _with_module_prefix(on_report: Callable[[SiteReport], None],
                        prefix: str) -> Callable[[SiteReport], None]:
    if not prefix:
        return on_report

    def prefixed(report: SiteReport) -> None:
        on_report(SiteReport([dataclasses.replace(r, name=f"{prefix}.{r.name}")
                              for r in report.sites]))
    return prefixed


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
