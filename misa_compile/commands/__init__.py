"""Subcommands of the `misa` command line (see misa_compile/cli.py)."""
