"""The `misa` command line. Each subcommand lives in misa_compile/commands/<name>.py and exposes
`add_arguments(parser)` and `run(args) -> int`; it is imported only when chosen, so `misa --help`
stays fast.

Errors are one line on stderr: a bad command line (UsageError) exits 2, any other failure exits 1;
--debug shows the traceback instead."""
from __future__ import annotations

import argparse
import importlib
import sys

from misa_compile import __version__
from misa_compile.commands.checks import UsageError

SUBCOMMANDS = {
    "eval": "measure selection quality (recall, IoU, needle heatmaps) of MISA variants",
    "export": "export a model with its indexers rewritten, as a torch.export program or ONNX",
    "tune": "choose per indexer site the cheapest MISA setting that keeps a recall target",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (flags, options whose
    default comes from elsewhere and is spelt out in their help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == []:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="misa", description="misa-compile command line",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"misa {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the full traceback")
    subparsers = parser.add_subparsers(dest="command", required=True)
    chosen = next((arg for arg in argv if arg in SUBCOMMANDS), None)
    for name, summary in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=summary, description=summary,
                                    formatter_class=HelpFormatter)
        # SUPPRESS: a subcommand's parser would otherwise reset a --debug given before it.
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="on an error, show the full traceback")
        if name == chosen:
            _command_module(name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    prefix = f"misa {args.command}"
    try:
        return _command_module(args.command).run(args)
    except UsageError as error:
        if args.debug:
            raise
        print(f"{prefix}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # anything else: one line, the traceback only on request
        if args.debug:
            raise
        print(f"{prefix}: {type(error).__name__}: {_first_line(error)} (--debug shows the "
              "traceback)", file=sys.stderr)
        return 1


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "(no message)"


def _command_module(name: str):
    return importlib.import_module(f"misa_compile.commands.{name}_cmd")


if __name__ == "__main__":
    sys.exit(main())
