"""`misa eval`: recall and IoU of the dense selection for MISA (h in --heads), MISA-hierarchical
and HISA, per layer and overall, across context lengths; a needle heatmap; time per variant.
Writes report.md, report.json and needle_heatmap.png to --out and prints the tables."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from misa_compile.config import VARIANTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from misa_compile.eval.settings import FULL, QUICK
    from misa_compile.eval.workloads import SETTINGS

    parser.add_argument("--workload", choices=SETTINGS, default=None,
                        help="synthetic workload to measure on (default: structured, or none "
                             "when --captured is given)")
    parser.add_argument("--captured", metavar="FILE",
                        help="tensors recorded with misa_compile.eval.capture_indexer_sites "
                             "(.safetensors with its .json sidecar): evaluate every variant on "
                             "them")
    parser.add_argument("--quick", action="store_true",
                        help=f"small preset: lengths {list(QUICK.lengths)}, {QUICK.queries} "
                             f"queries, k_top {QUICK.k_top}, router block {QUICK.block_size}, "
                             f"candidates {QUICK.candidates}, HISA block {QUICK.hisa_block} "
                             "(every key-count knob scaled like the context)")
    parser.add_argument("--lengths", type=int, nargs="+", metavar="T",
                        help=f"context lengths (default {list(FULL.lengths)}, --quick "
                             f"{list(QUICK.lengths)})")
    parser.add_argument("--heads", type=int, nargs="+", metavar="h",
                        help=f"active heads h of the MISA variants (default "
                             f"{list(FULL.active_heads)}; h > H is skipped)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, metavar="VARIANT",
                        help=f"variants to compare with dense, from {list(VARIANTS)} (default all)")
    parser.add_argument("--out", default="reports/eval", metavar="DIR", help="report folder")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"workload seed (default {FULL.seed})")
    parser.add_argument("--index-heads", type=int, metavar="H",
                        help=f"indexer heads H of the synthetic workloads (default "
                             f"{FULL.index_heads})")
    parser.add_argument("--head-dim", type=int, metavar="D",
                        help=f"indexer head dim D (default {FULL.head_dim})")

    def preset(field: str) -> str:
        full, quick = getattr(FULL, field), getattr(QUICK, field)
        return f"default {full}" + (f", --quick {quick}" if quick != full else "")

    parser.add_argument("--queries", type=int, metavar="S",
                        help=f"queries at the end of each synthetic context ({preset('queries')})")
    parser.add_argument("--k-top", type=int,
                        help=f"keys each query selects ({preset('k_top')}); recall is n/a "
                             "where k_top >= T (every key is selected)")
    parser.add_argument("--layers", type=int,
                        help=f"synthetic layers (seeds) per length ({preset('layers')})")
    parser.add_argument("--block-size", type=int,
                        help=f"MISA router block ({preset('block_size')})")
    parser.add_argument("--candidates", type=int,
                        help=f"MISA-hier candidates ({preset('candidates')})")
    parser.add_argument("--hisa-block", type=int, help=f"HISA block size ({preset('hisa_block')})")
    parser.add_argument("--hisa-blocks", type=int,
                        help=f"HISA blocks kept ({preset('hisa_blocks')})")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help=f"dtype of the synthetic q, k, w, compute is fp32 "
                             f"({preset('dtype')})")
    parser.add_argument("--repeats", type=int,
                        help=f"timed calls per variant and layer, after one untimed warm-up "
                             f"call; the tables show the median (min-max) of the calls of all "
                             f"layers, 0 times the warm-up call alone ({preset('repeats')})")
    parser.add_argument("--no-needle", action="store_true", help="skip the needle heatmap")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# Command-line option -> EvalSettings field, for the options that map one to one.
_OVERRIDES = {"lengths": "lengths", "heads": "active_heads", "variants": "variants",
              "seed": "seed", "index_heads": "index_heads", "head_dim": "head_dim",
              "queries": "queries", "k_top": "k_top", "layers": "layers",
              "block_size": "block_size", "candidates": "candidates", "hisa_block": "hisa_block",
              "hisa_blocks": "hisa_blocks", "dtype": "dtype", "repeats": "repeats"}
_POSITIVE = ("lengths", "heads", "index_heads", "head_dim", "queries", "k_top", "layers",
             "block_size", "candidates", "hisa_block", "hisa_blocks")


def settings_from_args(args: argparse.Namespace):
    from misa_compile.eval.settings import FULL, QUICK

    settings = QUICK if args.quick else FULL
    changes = {}
    for option, name in _OVERRIDES.items():
        value = getattr(args, option)
        if value is None:
            continue
        if option in _POSITIVE:
            for item in value if isinstance(value, list) else [value]:
                if item < 1:
                    raise ValueError(f"--{option.replace('_', '-')}={item}: must be >= 1")
        if option == "repeats" and value < 0:
            raise ValueError(f"--repeats={value}: must be >= 0")
        changes[name] = tuple(value) if isinstance(value, list) else value
    if "lengths" in changes:
        changes["needle_lengths"] = changes["lengths"]
    workload = args.workload or (None if args.captured else "structured")
    return dataclasses.replace(settings, workload=workload, **changes)


def run(args: argparse.Namespace) -> int:
    from misa_compile.commands.checks import (UsageError, available_device, readable_file,
                                              writable_folder)
    from misa_compile.eval.capture import sidecar_path
    from misa_compile.eval.report import terminal_tables, write_report
    from misa_compile.eval.runner import run_evaluation

    try:
        settings = settings_from_args(args)
    except ValueError as error:
        raise UsageError(str(error)) from error
    device = available_device(args.device)
    writable_folder(args.out, "--out")
    if args.captured:
        captured = readable_file(args.captured, "--captured")
        sidecar = sidecar_path(captured)
        if not sidecar.is_file():
            raise UsageError(f"--captured {args.captured}: its JSON sidecar {sidecar} is missing "
                             "(save_sites writes both)")
    report = run_evaluation(settings, device=device, captured=args.captured,
                            needle=not args.no_needle,
                            progress=not args.no_progress and sys.stderr.isatty())
    written = write_report(report, args.out)
    print(terminal_tables(report))
    print()
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0
