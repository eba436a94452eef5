"""The ``pyengine`` command line: one module per subcommand in :mod:`pyengine.cli.commands`,
each with ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``. Commands turn flags into
the library's config objects; no module below this package reads argparse.

:func:`main` is the one error boundary: every flag is checked before a command starts
(:mod:`pyengine.cli.checks`), and any failure ends in one line on stderr naming what to fix
and a non-zero exit (``--debug``, or PYENGINE_DEBUG=1, adds the traceback)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
import warnings

# the subcommands, in the order --help lists them
COMMANDS = ("demo", "prune", "spec", "compile", "cost", "bench", "profile", "sweep", "route",
            "limit", "latency-table")
DEBUG_HELP = "show the full traceback of an error"


def command(name: str):
    """The module of subcommand ``name``."""
    return importlib.import_module(f"pyengine.cli.commands.{name.replace('-', '_')}")


def build_parser() -> argparse.ArgumentParser:
    from pyengine import __version__
    p = argparse.ArgumentParser(prog="pyengine", description=(
        "Structured pruning of timm Vision Transformers into dense, smaller models that are "
        "measured, not estimated, to be faster."))
    p.add_argument("--version", action="version", version=f"pyengine {__version__}")
    p.add_argument("--debug", dest="debug_all", action="store_true", help=DEBUG_HELP)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = command(name)
        sp = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", None))
        mod.add_arguments(sp)
        sp.add_argument("--debug", action="store_true", help=DEBUG_HELP)
        sp.set_defaults(func=mod.run)
    return p


# what a user can fix from the message alone; anything else is a bug: the line says so
_EXPECTED = (ValueError, OSError, NotImplementedError, FloatingPointError)


def _expected(e: BaseException) -> bool:
    from pyengine.models import UnsupportedModuleError
    from pyengine.ops.dispatch import BackendNotAvailable
    return isinstance(e, (*_EXPECTED, UnsupportedModuleError, BackendNotAvailable))


def error_line(e: BaseException, args: argparse.Namespace | None = None) -> str:
    """One line for ``e``: a setting's name becomes its flag (min_heads -> --min-heads)."""
    from pyengine.errors import SettingError
    msg = " ".join(str(e).split()) or type(e).__name__
    setting = getattr(e, "setting", None)
    if isinstance(e, SettingError) and args is not None and hasattr(args, setting):
        flag = "--" + setting.replace("_", "-")
        if msg.startswith(setting) and not msg.startswith(flag):
            msg = flag + msg[len(setting):]
    if not _expected(e):
        msg += f" ({type(e).__name__}; run with --debug for the traceback)"
    return msg


def main(argv: list[str] | None = None) -> int:
    from pyengine.cli.checks import check
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command is None:
        parser.print_help()
        return 0
    debug = a.debug or a.debug_all or os.environ.get("PYENGINE_DEBUG", "") not in ("", "0")

    def one_line(message, category, filename, lineno, file=None, line=None):
        print(f"pyengine {a.command}: warning: {' '.join(str(message).split())}",
              file=file or sys.stderr)
    try:
        with warnings.catch_warnings():
            if not debug:  # a warning is one line too (--debug: where it came from)
                warnings.showwarning = one_line
            check(a.command, a)  # every flag, before any work
            return a.func(a)
    except KeyboardInterrupt:
        print(f"pyengine {a.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one error boundary
        if debug:
            traceback.print_exc()
        print(f"pyengine {a.command}: error: {error_line(e, a)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
