"""The ``pyengine`` command line: one module per subcommand in :mod:`pyengine.cli.commands`,
each with ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``. Commands turn flags into
the library's config objects; no module below this package reads argparse."""
from __future__ import annotations

import argparse
import importlib
import sys

# the subcommands, in the order --help lists them
COMMANDS = ("demo", "prune", "spec", "compile", "cost", "bench", "profile", "sweep", "route",
            "limit", "latency-table")


def command(name: str):
    """The module of subcommand ``name``."""
    return importlib.import_module(f"pyengine.cli.commands.{name.replace('-', '_')}")


def build_parser() -> argparse.ArgumentParser:
    from pyengine import __version__
    p = argparse.ArgumentParser(prog="pyengine", description=(
        "Structured pruning of timm Vision Transformers into dense, smaller models that are "
        "measured, not estimated, to be faster."))
    p.add_argument("--version", action="version", version=f"pyengine {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = command(name)
        sp = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", None))
        mod.add_arguments(sp)
        sp.set_defaults(func=mod.run)
    return p


def main(argv: list[str] | None = None) -> int:
    from pyengine.models import UnsupportedModuleError
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command is None:
        parser.print_help()
        return 0
    try:
        return a.func(a)
    except (ValueError, FileNotFoundError, NotImplementedError, UnsupportedModuleError) as e:
        # bad specs, unsupported models, missing files: a message, not a traceback
        print(f"pyengine {a.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
