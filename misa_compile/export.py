"""Offline export: a torch.export program whose DSA indexer sites are rewritten into misa ops.

    result = misa_compile.export(model, (input_ids,), config=MisaConfig(variant="misa"))
    print(result.report)                      # what the graph pass rewrote or refused
    result.save("model.pt2")                  # torch.export.save of result.program
    program = misa_compile.load("model.pt2")  # registers the misa ops, then torch.export.load

The program is built with torch.export.export, run_decompositions() (the ATen graph the pass is
written for), then the same graph pass as the torch.compile backend, applied through
ExportedProgram._transform_do_not_use so that the graph signature stays in sync and the program
still saves and loads.

A plain torch.export.load of a program holding misa ops fails unless misa_compile was imported
first: torch raises "RuntimeError: We ran into an error when deserializing the saved file" and
only its logged warning names the op it could not resolve. misa_compile.load imports the ops and,
when a file still needs something nobody registered, says what in its error (LoadError).

For serving without misa_compile, package_aoti compiles the program with AOTInductor:

    misa_compile.package_aoti(result, "model_aoti.pt2")
    # in any process, misa_compile not imported:
    compiled = torch._inductor.aoti_load_package("model_aoti.pt2")"""
from __future__ import annotations

import logging
import os
import re
import zipfile
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch.export import ExportedProgram

from .config import MisaConfig
from .unapplied import warn_unapplied

PathLike = Union[str, os.PathLike]


class ExportError(RuntimeError):
    """The model could not be captured or rewritten into an exportable program."""


class LoadError(RuntimeError):
    """A saved program cannot be loaded: it needs custom ops or types not registered here."""


class PackageError(RuntimeError):
    """The program could not be compiled into an AOTInductor package."""


@dataclass(frozen=True)
class MisaExport:
    """The result of misa_compile.export.

    program: the rewritten torch.export.ExportedProgram (run it with program.module()(...)).
    report:  the SiteReport of the graph pass: every indexer site, rewritten or refused and why.
    config:  the MisaConfig the sites were rewritten with."""

    program: ExportedProgram
    report: Any
    config: MisaConfig

    def save(self, path: PathLike) -> None:
        """torch.export.save of the program; load it back with misa_compile.load."""
        torch.export.save(self.program, path)


def export(model: torch.nn.Module, args: Any, kwargs: Optional[dict] = None, *,
           config: MisaConfig = MisaConfig(), dynamic_shapes: Any = None,
           strict: bool = False) -> MisaExport:
    """Exports `model` called with `args` (a tensor or a tuple) and `kwargs`, with every DSA
    indexer site rewritten as `config` says. `dynamic_shapes` and `strict` are passed to
    torch.export.export unchanged. Raises ExportError when torch.export cannot capture the model;
    warns (misa_compile.unapplied.UnappliedSettingWarning) when a site was refused because `config`
    does not fit it, or no indexer was rewritten."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"misa_compile.export: model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    if not isinstance(config, MisaConfig):
        raise TypeError(f"misa_compile.export: config must be a MisaConfig, got "
                        f"{type(config).__name__}")
    args = args if isinstance(args, tuple) else (args,)
    try:
        program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes,
                                      strict=strict)
    except Exception as error:  # torch.export raises many unrelated types; all mean "not captured"
        raise ExportError(
            f"misa_compile.export: torch.export could not capture {type(model).__name__}:\n"
            f"{_leading_lines(error, 6)}\n(the full torch.export error is chained below)") \
            from error
    program = program.run_decompositions()
    result = _rewrite(program, config)
    warn_unapplied(result.report, whole_model=True)
    return result


def _rewrite(program: ExportedProgram, config: MisaConfig) -> MisaExport:
    # Imported here: the graph pass pulls in the matcher, which only export and compile need.
    from torch.fx.passes.infra.pass_base import PassResult

    from .passes.rewrite_indexers import rewrite_indexer_sites

    reports = []

    def rewrite_pass(graph_module: torch.fx.GraphModule) -> PassResult:
        report = rewrite_indexer_sites(graph_module, config)
        reports.append(report)
        return PassResult(graph_module, bool(report.rewritten))

    program = program._transform_do_not_use(rewrite_pass)
    return MisaExport(program=program, report=reports[0], config=config)


def package_aoti(program: Union[MisaExport, ExportedProgram], path: PathLike, *,
                 inductor_configs: Optional[dict[str, Any]] = None) -> str:
    """Compiles a rewritten program (a MisaExport or its ExportedProgram) ahead of time with
    torch._inductor.aoti_compile_and_package and writes the package to `path` (a .pt2 file,
    unlike misa_compile.load's). Returns the path written. `inductor_configs` is passed on.

    The package runs where misa_compile is not installed: torch._inductor.aoti_load_package(path)
    and call it with the program's inputs, at the shapes the program was exported for. A misa op
    whose implementation Inductor cannot trace into (a Python custom op: every op on CPU, and on
    CUDA each op without a FunctionalTensorMode decomposition into Triton kernels) is replaced
    beforehand by its torch implementation (kernels/torch_impl.py), so the package holds only
    ATen, C++ and Triton code; the torch implementation unrolls its query chunks, so it needs the
    query and key counts of each site fixed (export without dynamic shapes). Raises PackageError
    when torch cannot compile the program."""
    if isinstance(program, MisaExport):
        program = program.program
    if not isinstance(program, ExportedProgram):
        raise TypeError("misa_compile.package_aoti: program must be a MisaExport or an "
                        f"ExportedProgram, got {type(program).__name__}")
    opaque = _opaque_misa_ops(program)
    try:
        if opaque:
            table = torch.export.default_decompositions()
            table.update({op: _torch_implementation(op) for op in opaque})
            program = program.run_decompositions(table)
        return torch._inductor.aoti_compile_and_package(
            program, package_path=os.fspath(path), inductor_configs=inductor_configs)
    except Exception as error:  # torch raises many types for one meaning: "not compiled"
        raise PackageError(
            f"misa_compile.package_aoti: AOTInductor could not compile the program into "
            f"{os.fspath(path)}:\n{_leading_lines(error, 6)}\n(the full error is chained "
            "below)") from error


def _kernels_cover(op: torch._ops.OpOverload, node: torch.fx.Node) -> bool:
    """Whether the Triton kernels take this CUDA call (kernels/coverage.py, the table the
    FunctionalTensorMode rule decides by): a call they do not cover stays opaque under the rule."""
    from .kernels.coverage import cuda_fallback_reason

    names = [argument.name for argument in op._schema.arguments]
    bound = dict(zip(names, node.args), **node.kwargs)
    return cuda_fallback_reason(op._opname, bound.get("router", "score")) is None


def _opaque_misa_ops(program: ExportedProgram) -> list[torch._ops.OpOverload]:
    """The misa ops the program calls that Inductor would leave as calls into Python: all of
    them on CPU; on CUDA those without a FunctionalTensorMode rule (the rule that lets Inductor
    trace a torch.library.triton_op into its Triton kernels), or called with arguments the
    kernels do not cover (the rule then keeps the op as it is). PackageError when such an op has a
    symbolic size: its torch implementation would be traced at the example's sizes and the
    package would silently compute those sizes for any input."""
    from torch._library.simple_registry import find_torch_dispatch_rule
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    opaque: list[torch._ops.OpOverload] = []
    for node in program.graph.nodes:
        op = node.target
        if node.op != "call_function" or getattr(op, "namespace", None) != "misa":
            continue
        tensors = [value.meta["val"] for value in
                   torch.utils._pytree.tree_leaves((node.args, node.kwargs))
                   if isinstance(value, torch.fx.Node)
                   and isinstance(value.meta.get("val"), torch.Tensor)]
        on_cuda = any(t.device.type == "cuda" for t in tensors)
        if on_cuda and find_torch_dispatch_rule(op, FunctionalTensorMode) is not None \
                and _kernels_cover(op, node):
            continue
        symbolic = [t for t in tensors if not all(isinstance(size, int) for size in t.shape)]
        if symbolic:
            raise PackageError(
                f"misa_compile.package_aoti: {node.name} ({op}) has symbolic sizes "
                f"{list(symbolic[0].shape)}; the package replaces it by its torch implementation, "
                "which is traced at fixed query and key counts: export without dynamic shapes "
                "(misa export without --dynamic)")
        if op not in opaque:
            opaque.append(op)
    return opaque


def _torch_implementation(op: torch._ops.OpOverload):
    """A decomposition of `op` into kernels/torch_impl.py's function of the same name. It runs
    below functionalization (run_decompositions applies decompositions while tracing the
    functional graph), and the torch implementation writes its results into preallocated
    tensors, so it is functionalized here, as torch.library.triton_op does for its bodies."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode, dispatch_functionalize

    from .kernels import torch_impl

    name = op._schema.name.split("::")[-1]
    implementation = getattr(torch_impl, name, None)
    if implementation is None:
        raise PackageError(f"misa_compile.package_aoti: misa::{name} has no torch "
                           "implementation to put in the package")
    schema = op._schema.arguments

    def decomposition(*args: Any, **kwargs: Any) -> Any:
        # torch_impl takes every argument positionally, in the op's schema order.
        values = list(args) + [kwargs[a.name] if a.name in kwargs else a.default_value
                               for a in schema[len(args):]]
        return dispatch_functionalize(implementation, FunctionalTensorMode())(*values)
    return decomposition


def load(path: PathLike) -> ExportedProgram:
    """torch.export.load with the misa ops registered. Every failure raises LoadError naming the
    file and what is wrong with it: missing, empty, not a .pt2 archive, damaged (a member fails its
    checksum, say), the custom ops nobody registered (saved by another misa_compile version, or
    with another library's ops), or the input/output type whose module must be imported first.
    torch.export.load itself raises a generic "error when deserializing" RuntimeError (or worse, a
    UnicodeDecodeError) and logs its traceback as a warning; that log is kept off the console."""
    from . import kernels  # noqa: F401  (registers torch.ops.misa.*)

    problem = unreadable_archive(path)
    if problem:
        raise LoadError(f"misa_compile.load: cannot load {os.fspath(path)}: {problem}")
    causes = _LoggedErrors()
    torch_export_log = logging.getLogger("torch.export")
    propagates = torch_export_log.propagate
    torch_export_log.addHandler(causes)
    torch_export_log.propagate = False
    try:
        return torch.export.load(path)
    except Exception as error:  # torch raises many types for one meaning: "cannot load this"
        missing = unresolved_ops(path)
        if missing:
            raise LoadError(_missing_ops_message(path, missing)) from error
        if causes.errors:
            raise LoadError(_load_failure_message(path, causes.errors[-1])) from causes.errors[-1]
        raise LoadError(f"misa_compile.load: cannot load {os.fspath(path)}: "
                        f"{type(error).__name__}: {_first_line(error)}; the file is damaged or "
                        "was not written by torch.export.save") from error
    finally:
        torch_export_log.removeHandler(causes)
        torch_export_log.propagate = propagates


def unreadable_archive(path: PathLike) -> str:
    """What makes `path` unreadable as a torch.export archive (a zip file), or "" if nothing."""
    if not os.path.exists(path):
        return "no such file"
    if os.path.isdir(path):
        return "it is a folder, not a .pt2 file"
    if os.path.getsize(path) == 0:
        return "the file is empty"
    if not zipfile.is_zipfile(path):
        return ("not a torch.export archive (a .pt2 file is a zip archive written by "
                "torch.export.save; this one is not)")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, RuntimeError, ValueError) as error:
        return f"the archive is damaged ({_first_line(error)})"
    if damaged is not None:
        return f"the archive is damaged: its member {damaged} fails its checksum"
    return ""


class _LoggedErrors(logging.Handler):
    """Collects the exceptions attached to log records (torch.export.load logs its real error)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])


def _load_failure_message(path: PathLike, error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip()
    unregistered = re.search(r"Deserializing ([\w.]+) in pytree is not registered", text)
    if unregistered:
        type_path = unregistered.group(1)
        module = type_path.rpartition(".")[0]
        return (f"misa_compile.load: {os.fspath(path)} passes {type_path} in or out of the "
                f"program; that type is known to torch once its module is imported: import "
                f"{module} before loading")
    return (f"misa_compile.load: cannot load {os.fspath(path)}: {_first_line(error)}; the file "
            "is damaged or was not written by torch.export.save")


def unresolved_ops(path: PathLike) -> list[str]:
    """The custom ops ("namespace::name.overload") that a saved program calls and that are not
    registered in this process."""
    found: set[tuple[str, str, str]] = set()
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            if member.endswith(".json"):
                text = archive.read(member).decode("utf-8", errors="replace")
                found.update(_OP_TARGET.findall(text))
    return sorted(f"{ns}::{name}.{overload}" for ns, name, overload in found
                  if not _is_registered(ns, name, overload))


_OP_TARGET = re.compile(r"torch\.ops\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)")


def _is_registered(namespace: str, name: str, overload: str) -> bool:
    try:
        getattr(getattr(getattr(torch.ops, namespace), name), overload)
    except (AttributeError, RuntimeError):
        return False
    return True


def _missing_ops_message(path: PathLike, missing: list[str]) -> str:
    from . import __version__

    ours = [op for op in missing if op.startswith("misa::")]
    others = [op for op in missing if not op.startswith("misa::")]
    lines = [f"misa_compile.load: {os.fspath(path)} calls custom ops that are not registered in "
             "this process:"]
    if ours:
        lines.append(f"  {', '.join(ours)}: not provided by misa_compile {__version__}; the file "
                     "was saved by another misa_compile version, load it with that version")
    if others:
        lines.append(f"  {', '.join(others)}: import the library that defines them before "
                     "loading")
    return "\n".join(lines)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _leading_lines(error: BaseException, count: int) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return "\n".join("  " + line for line in lines[:count]) or f"  {type(error).__name__}"
