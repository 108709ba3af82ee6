"""`misa tune MODULE:FACTORY` (or --captured FILE): per indexer site, the cheapest MISA setting
(active heads h, or MISA-hierarchical, or dense) whose selection keeps --target-recall of the
dense indexer's on the model's own inputs. Writes DIR/tuned.json (options for torch.compile and
`misa export --config`), tune.md, tune.json and tune.png, and prints the per-site table.

The factory is called as for `misa export`: it returns (model, example_args), and the model runs
once on example_args, compiled with the dense variant, while every indexer site is recorded."""
from __future__ import annotations

import argparse
import sys

from misa_compile.commands.checks import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("factory", metavar="MODULE:FACTORY", nargs="?",
                        help="function returning (model, example_args), as for misa export")
    parser.add_argument("--factory-arg", action="append", default=[], metavar="NAME=VALUE",
                        help="keyword argument for FACTORY, a Python literal or a string; "
                             "repeatable")
    parser.add_argument("--captured", metavar="FILE",
                        help="tune on sites saved with misa_compile.eval.capture (.safetensors "
                             "with its .json sidecar) instead of running a model; the sites are "
                             "then addressed by position (0, 1, ...: the layer index when each "
                             "layer has one indexer)")
    parser.add_argument("--target-recall", type=float, default=0.95,
                        help="recall of the dense selection each site must keep, in (0, 1]")
    parser.add_argument("--metric", choices=("mean", "p10"), default="mean",
                        help="recall over the tuning queries: their mean, or the 10th-percentile "
                             "query")
    parser.add_argument("--block-size", type=int, default=1024, metavar="B",
                        help="MISA router key block (written into the tuned config)")
    parser.add_argument("--candidates", type=int, metavar="N",
                        help="MISA-hierarchical candidates, tried where plain MISA misses the "
                             "target (default 4 x the site's k_top)")
    parser.add_argument("--heads", type=int, nargs="+", metavar="h",
                        help="the h grid (default 1, 2, 4, ... up to H, and H)")
    parser.add_argument("--baseline-heads", type=int, default=8, metavar="h",
                        help="the uniform h the speedup is quoted against")
    parser.add_argument("--costs", metavar="FILE.json",
                        help="measured times per variant, {\"dense\": t, \"misa\": {\"h\": t, "
                             "...}, \"misa_hier\": {...}}, instead of relative FLOPs")
    parser.add_argument("--out", default="reports/tune", metavar="DIR",
                        help="folder for tuned.json, tune.md, tune.json, tune.png")


def run(args: argparse.Namespace) -> int:
    from misa_compile.commands.checks import readable_file, writable_folder
    from misa_compile.tune import CostModel, MeasuredTimes, TuneSettings, tune_sites
    from misa_compile.tune.report import terminal_table, write_outputs

    if bool(args.factory) == bool(args.captured):
        raise UsageError("give MODULE:FACTORY or --captured FILE (one of them)")
    if args.captured and args.factory_arg:
        raise UsageError("--factory-arg needs MODULE:FACTORY, not --captured")
    try:
        settings = TuneSettings(target_recall=args.target_recall, metric=args.metric,
                                block_size=args.block_size, candidates=args.candidates,
                                heads=tuple(args.heads) if args.heads else None,
                                baseline_heads=args.baseline_heads)
    except ValueError as error:
        raise UsageError("--" + str(error).replace("_", "-")) from error
    measured = None
    if args.costs:
        try:
            measured = MeasuredTimes.from_file(readable_file(args.costs, "--costs"))
        except ValueError as error:
            raise UsageError(f"--costs {error}") from error
    writable_folder(args.out, "--out")
    sites, source = _sites(args)
    result = tune_sites(sites, settings, CostModel(measured))
    written = write_outputs(result, args.out, source)
    print(terminal_table(result))
    print()
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


def _sites(args: argparse.Namespace):
    from misa_compile.tune import capture_model_sites, sites_from_capture

    if args.captured:
        from misa_compile.commands.checks import readable_file
        from misa_compile.eval.capture import load_sites, sidecar_path

        captured = readable_file(args.captured, "--captured")
        if not sidecar_path(captured).is_file():
            raise UsageError(f"--captured {args.captured}: its JSON sidecar "
                             f"{sidecar_path(captured)} is missing (save_sites writes both)")
        return sites_from_capture(load_sites(captured)), f"captured sites {args.captured}"
    from misa_compile.commands.export_cmd import (call_factory, check_factory_kwargs,
                                                  load_factory, parse_factory_args)

    factory = load_factory(args.factory)
    kwargs = parse_factory_args(args.factory_arg)
    check_factory_kwargs(factory, kwargs, args.factory)
    model, example_args = call_factory(factory, kwargs, args.factory)
    print(f"misa tune: capturing the indexer sites of {args.factory}", file=sys.stderr)
    described = " ".join([args.factory] + [f"--factory-arg {a}" for a in args.factory_arg])
    device = next((str(arg.device) for arg in example_args if hasattr(arg, "device")), "cpu")
    return capture_model_sites(model, example_args), f"{described}, captured on {device}"
