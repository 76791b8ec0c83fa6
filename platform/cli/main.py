"""The ``fogmig`` command line: one entry point, one subcommand module per concern.

Every subcommand module exposes ``register(subparsers)`` and sets ``func`` on its parser;
``func(args)`` returns the exit code. Errors of the :class:`FogmigError` tree become a message,
its hint, and exit code 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from rich.console import Console

from fogmig import __version__
from fogmig.platform.base.errors import FogmigError

# Modules that contribute subcommands, in the order `fogmig --help` lists them.
COMMAND_MODULES = (
    "fogmig.platform.cli.doctor",
    "fogmig.platform.cli.testbed",
    "fogmig.platform.cli.services",
    "fogmig.platform.cli.deploy",
    "fogmig.platform.cli.transfer_bench",
    "fogmig.platform.cli.agent",
    "fogmig.platform.cli.controller",
    "fogmig.platform.cli.experiment",
    "fogmig.platform.cli.baseline",
    "fogmig.platform.cli.policycheck",
    "fogmig.platform.cli.device_sim",
    "fogmig.platform.cli.demo",
    "fogmig.platform.cli.soak",
)

err_console = Console(stderr=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fogmig",
        description="Mobility-aware fog platform: stateful migration of CoAP services.",
    )
    parser.add_argument("--version", action="version", version=f"fogmig {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        code: int = func(args)
    except FogmigError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        if exc.hint:
            err_console.print(f"[yellow]hint:[/] {exc.hint}", markup=True, highlight=False)
        return 1
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
