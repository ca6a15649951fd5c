"""The `expertd` command line: one console script, subcommands registered per module.

Each command module exposes ``register(subparsers)``; the modules keep their heavy
imports (torch, zmq) inside the command functions, so `expertd --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# Modules that add subcommands, in the order `expertd --help` lists them.
COMMAND_MODULES = (
    "expertd.daemon.cli.replay_cli",  # replay
    "expertd.daemon.cli.trace_cli",  # trace convert, trace stats
    "expertd.daemon.cli.store_cli",  # pack, store info, store verify
    "expertd.daemon.cli.serve_cli",  # serve, status, shutdown
    "expertd.daemon.cli.keys_cli",  # keys new, allow, list, revoke
    "expertd.daemon.cli.demo",  # demo
)

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran and found a problem (e.g. a corrupt expert)
EXIT_USAGE = 2  # bad arguments or bad input: nothing was done


class CliError(Exception):
    """A user-facing error: printed as one line, exit code `EXIT_USAGE` unless given."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="expertd",
        description="A tiered expert-offloading cache for Mixture-of-Experts inference.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or EXIT_OK)
    except CliError as exc:
        print(f"expertd {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"expertd {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `expertd ... | head` closed our stdout: not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":  # run as `python -m expertd.daemon` (see __main__.py) instead
    sys.exit(main())
