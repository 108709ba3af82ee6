"""The `misa` command line. Each subcommand lives in misa_compile/commands/<name>.py and exposes
`add_arguments(parser)` and `run(args) -> int`; it is imported only when chosen, so `misa --help`
stays fast."""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "eval": "measure selection quality (recall, IoU, needle heatmaps) of MISA variants",
    "export": "export a model with its indexers rewritten, as a torch.export program or ONNX",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="misa", description="misa-compile command line")
    subparsers = parser.add_subparsers(dest="command", required=True)
    chosen = next((arg for arg in argv if arg in SUBCOMMANDS), None)
    for name, summary in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=summary, description=summary)
        if name == chosen:
            _command_module(name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    return _command_module(args.command).run(args)


def _command_module(name: str):
    return importlib.import_module(f"misa_compile.commands.{name}_cmd")


if __name__ == "__main__":
    sys.exit(main())
