"""`misa export MODULE:FACTORY`: export a model with its DSA indexers rewritten into misa ops, as a
torch.export program (--out model.pt2, load it with misa_compile.load), an ONNX model of standard
operators (--onnx model.onnx) and/or an AOTInductor package that runs without misa_compile
(--aoti model_aoti.pt2, load it with torch._inductor.aoti_load_package). Prints the site report:
which indexers were rewritten, which were refused and why.

FACTORY is a function in an importable module (the current directory is importable) that returns
(model, example_args): an nn.Module and its positional example inputs, one tensor or a tuple.
--factory-arg NAME=VALUE passes keyword arguments to it, e.g.

    misa export misa_compile.models.deepseek_v32_tiny:tiny_deepseek_v32 \\
        --factory-arg layers=2 --factory-arg experts_implementation=batched_mm \\
        --variant misa --active-heads 2 --dynamic --out tiny.pt2 --onnx tiny.onnx"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import os
import re
import sys
import warnings
from typing import Any

from misa_compile.commands.checks import UsageError, writable_file
from misa_compile.config import ROUTERS, VARIANTS

# Command-line option -> MisaConfig field.
_CONFIG_OPTIONS = {"variant": "variant", "active_heads": "active_heads",
                   "block_size": "block_size", "candidates": "candidates",
                   "hisa_block": "hisa_block", "hisa_blocks": "hisa_blocks", "router": "router"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("factory", metavar="MODULE:FACTORY",
                        help="function returning (model, example_args), example_args one tensor "
                             "or a tuple of positional inputs")
    parser.add_argument("--factory-arg", action="append", default=[], metavar="NAME=VALUE",
                        help="keyword argument for FACTORY; VALUE is read as a Python literal "
                             "(3, 0.5, True, \"text\"), else taken as a string; repeatable")
    parser.add_argument("--out", metavar="FILE.pt2",
                        help="write the rewritten torch.export program (misa_compile.load reads "
                             "it)")
    parser.add_argument("--onnx", metavar="FILE.onnx",
                        help="write an ONNX model; misa ops become standard ONNX operators")
    parser.add_argument("--aoti", metavar="FILE.pt2",
                        help="write an AOTInductor package (torch._inductor.aoti_load_package "
                             "runs it without misa_compile); on CPU it needs static shapes (no "
                             "--dynamic)")
    parser.add_argument("--config", metavar="FILE.json",
                        help="MisaConfig fields as a JSON object, per-site settings included "
                             "(e.g. the tuned.json of misa tune); the options below override "
                             "its model-wide fields")
    parser.add_argument("--variant", choices=VARIANTS, default=None,
                        help="what each indexer becomes (default misa)")
    parser.add_argument("--active-heads", type=int, metavar="h", help="MISA heads per query")
    parser.add_argument("--block-size", type=int, metavar="B", help="MISA router key block")
    parser.add_argument("--candidates", type=int, metavar="N",
                        help="misa_hier candidates re-ranked")
    parser.add_argument("--hisa-block", type=int, metavar="B", help="HISA key block")
    parser.add_argument("--hisa-blocks", type=int, metavar="M", help="HISA blocks kept")
    parser.add_argument("--router", choices=ROUTERS, default=None,
                        help="MISA router: score (the paper's) or qnorm")
    parser.add_argument("--dynamic", action="store_true",
                        help="export every axis of every tensor input as dynamic where the model "
                             "allows it (batch, sequence, key axes); the model's own sizes stay "
                             "fixed")
    parser.add_argument("--custom-domain", action="store_true",
                        help="ONNX: one 'misa'-domain node per op (for runtimes with plugins) "
                             "instead of standard operators")
    parser.add_argument("--topk-limit", type=int, metavar="K",
                        help="ONNX: refuse sites whose TopK needs k > K (3840 for TensorRT)")
    parser.add_argument("--allow-refused", action="store_true",
                        help="write the files even when the settings did not apply everywhere "
                             "(a site refused for config_mismatch, or no indexer rewritten); "
                             "without it that is an error, exit status 1")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Checks every argument (UsageError, raised to the command line's handler), then exports."""
    if not args.out and not args.onnx and not args.aoti:
        raise UsageError("give --out FILE.pt2, --onnx FILE.onnx, --aoti FILE.pt2, or several")
    if args.out:
        writable_file(args.out, "--out", ".pt2", "a torch.export program (for ONNX use --onnx)")
    if args.onnx:
        writable_file(args.onnx, "--onnx", ".onnx", "an ONNX model")
    if args.aoti:
        writable_file(args.aoti, "--aoti", ".pt2", "an AOTInductor package")
    outputs = [(option, path) for option, path in
               (("--out", args.out), ("--onnx", args.onnx), ("--aoti", args.aoti)) if path]
    for i, (option, path) in enumerate(outputs):
        for other, other_path in outputs[i + 1:]:
            if os.path.abspath(path) == os.path.abspath(other_path):
                raise UsageError(f"{option} and {other} name the same file")
    config = config_from_args(args)
    factory = load_factory(args.factory)
    factory_kwargs = parse_factory_args(args.factory_arg)
    check_factory_kwargs(factory, factory_kwargs, args.factory)
    if args.topk_limit is not None and args.topk_limit < 1:
        raise UsageError(f"--topk-limit={args.topk_limit}: must be >= 1")
    from misa_compile.export import ExportError, PackageError
    from misa_compile.onnx_export import OnnxExportError, UnsupportedOnnxSite

    try:
        return _export(args, config, factory, factory_kwargs)
    except (ExportError, PackageError, OnnxExportError, UnsupportedOnnxSite,
            FactoryError) as error:
        # Their messages are written for the user, sometimes over several lines.
        print(f"misa export: {error}", file=sys.stderr)
        return 1


class FactoryError(RuntimeError):
    """The factory raised while building the model."""


def _export(args: argparse.Namespace, config, factory, factory_kwargs: dict[str, Any]) -> int:
    from tqdm import tqdm

    import misa_compile
    from misa_compile.unapplied import UnappliedSettingWarning, unapplied_settings

    stages = ["build the model", "export and rewrite"]
    stages += ["save " + args.out] if args.out else []
    stages += ["write " + args.onnx] if args.onnx else []
    stages += ["compile " + args.aoti] if args.aoti else []
    progress = tqdm(total=len(stages), desc="misa export", unit="stage", file=sys.stderr,
                    disable=args.no_progress or not sys.stderr.isatty())
    with progress:
        progress.set_postfix_str(stages[0])
        model, example_args = call_factory(factory, factory_kwargs, args.factory)
        progress.update()
        progress.set_postfix_str(stages[1])
        dynamic_shapes = dynamic_axes(example_args) if args.dynamic else None
        with warnings.catch_warnings():
            # Reported below, as an error unless --allow-refused.
            warnings.simplefilter("ignore", UnappliedSettingWarning)
            result = misa_compile.export(model, example_args, config=config,
                                         dynamic_shapes=dynamic_shapes)
        progress.update()
        unapplied = unapplied_settings(result.report, whole_model=True) + [
            f"sites[{selector!r}] of the config matches no indexer site"
            for selector in config.unmatched_selectors(site.name for site in result.report.sites)]
        if unapplied and not args.allow_refused:
            progress.close()
            print(result.report)
            print("misa export: the requested settings did not apply, nothing was written "
                  "(--allow-refused writes the files anyway):\n  " + "\n  ".join(unapplied),
                  file=sys.stderr)
            return 1
        if args.out:
            progress.set_postfix_str("save " + args.out)
            result.save(args.out)
            progress.update()
        if args.onnx:
            progress.set_postfix_str("write " + args.onnx)
            misa_compile.to_onnx(result, path=args.onnx, custom_domain=args.custom_domain,
                                 topk_limit=args.topk_limit)
            progress.update()
        if args.aoti:
            progress.set_postfix_str("compile " + args.aoti)
            misa_compile.package_aoti(result, args.aoti)
            progress.update()
    print(result.report)
    for line in unapplied:
        print(f"misa export: warning: {line}", file=sys.stderr)
    print("program inputs: " + ", ".join(input_shapes(result.program)))
    for path in (args.out, args.onnx, args.aoti):
        if path:
            print(f"wrote {path}")
    return 0


def config_from_args(args: argparse.Namespace):
    import dataclasses

    from misa_compile.config import MisaConfig

    base = config_from_file(args.config) if getattr(args, "config", None) else MisaConfig()
    fields = {field: getattr(args, option) for option, field in _CONFIG_OPTIONS.items()
              if getattr(args, option) is not None}
    try:
        return dataclasses.replace(base, **fields)
    except (TypeError, ValueError) as error:
        # MisaConfig names its field; the user typed the option.
        raise UsageError(re.sub(r"MisaConfig\.(\w+)",
                                lambda m: "--" + m.group(1).replace("_", "-"),
                                str(error))) from error


def config_from_file(path: str):
    """The MisaConfig a JSON file holds (a flat object of MisaConfig fields, as
    torch.compile's options= takes); UsageError naming the file for anything else."""
    import json

    from misa_compile.commands.checks import readable_file
    from misa_compile.config import MisaConfig

    try:
        options = json.loads(readable_file(path, "--config").read_text())
    except json.JSONDecodeError as error:
        raise UsageError(f"--config {path}: not valid JSON: {error}") from error
    if not isinstance(options, dict):
        raise UsageError(f"--config {path}: expected a JSON object of MisaConfig fields, got "
                         f"{type(options).__name__}")
    try:
        config, rest = MisaConfig.from_options(options)
    except (TypeError, ValueError) as error:
        raise UsageError(f"--config {path}: {error}") from error
    if rest:
        raise UsageError(f"--config {path}: unknown field(s) {sorted(rest)}; allowed: the "
                         "MisaConfig fields")
    return config


def load_factory(spec: str):
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"{spec!r}: expected MODULE:FACTORY, e.g. "
                         "misa_compile.models.deepseek_v32_tiny:tiny_deepseek_v32")
    # As `python -m` does, modules in the current directory are importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UsageError(f"{spec!r}: cannot import module {module_name!r}: {error}") from error
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise UsageError(f"{spec!r}: module {module_name!r} has no function {attribute!r}")
    return factory


def parse_factory_args(items: list[str]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.isidentifier():
            raise UsageError(f"--factory-arg {item!r}: expected NAME=VALUE")
        try:
            kwargs[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[name] = text
    return kwargs


def check_factory_kwargs(factory, kwargs: dict[str, Any], spec: str) -> None:
    """Refuses --factory-arg names the factory does not take, naming those it does (a factory
    with **kwargs checks its own, when called)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: let the call decide
        return
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return
    valid = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [name for name in kwargs if name not in valid]
    if unknown:
        raise UsageError(f"--factory-arg {', '.join(unknown)}: {spec} takes no such argument; "
                         f"it takes: {', '.join(valid) or 'none'}")


def call_factory(factory, kwargs: dict[str, Any], spec: str):
    """(model, example_args as a tuple) from the factory, checked."""
    import torch

    try:
        made = factory(**kwargs)
    except TypeError as error:
        raise UsageError(f"{spec}: calling it with {kwargs} failed: {error}") from error
    except Exception as error:  # the user's code: any failure, said in one line
        raise FactoryError(f"{spec} raised {type(error).__name__}: {error}") from error
    if not isinstance(made, (tuple, list)) or len(made) != 2:
        raise UsageError(f"{spec} must return (model, example_args), got "
                         f"{type(made).__name__}")
    model, example_args = made
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{spec} returned a {type(model).__name__} as the model; expected a "
                         "torch.nn.Module")
    example_args = example_args if isinstance(example_args, tuple) else (
        tuple(example_args) if isinstance(example_args, list) else (example_args,))
    if not any(isinstance(arg, torch.Tensor) for arg in example_args):
        raise UsageError(f"{spec} returned no tensor among the example inputs")
    return model, example_args


def dynamic_axes(example_args: tuple) -> tuple:
    """Every axis of every tensor input as Dim.AUTO: dynamic where the model allows it, static
    where the model fixes it (a weight's width, a head count) or the example has size 1."""
    import torch

    auto = torch.export.Dim.AUTO
    return tuple({axis: auto for axis in range(arg.dim())} if isinstance(arg, torch.Tensor)
                 else None for arg in example_args)


def input_shapes(program) -> list[str]:
    """"name[size, ...]" of each user input; a symbol (s0, ...) marks a dynamic axis."""
    from torch.export.graph_signature import InputKind

    user_inputs = {spec.arg.name for spec in program.graph_signature.input_specs
                   if spec.kind == InputKind.USER_INPUT}
    shapes = []
    for node in program.graph.nodes:
        value = node.meta.get("val")
        if node.op == "placeholder" and node.name in user_inputs and hasattr(value, "shape"):
            shapes.append(f"{node.name}[{', '.join(str(size) for size in value.shape)}]")
    return shapes
