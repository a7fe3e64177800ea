"""The ``azfs`` admin command: a thin dispatcher over per-topic modules.

Each module in :data:`COMMANDS` exposes ``register(subparsers)``, which adds
its sub-command(s) and sets ``func`` (a callable taking the parsed args and
returning an exit code).  Errors reach the user as one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import NoReturn

from azfs import __version__
from azfs.errors import AzfsError, UserError
from azfs.logs import setup_logging
from azfs.secret import redact

COMMANDS = (
    "azfs.cli.mount",
    "azfs.cli.dataset",
    "azfs.cli.volumes",
    "azfs.cli.agent",
    "azfs.cli.folder", "azfs.cli.kernel", "azfs.cli.user",
    "azfs.cli.up",
)


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line on stderr (exit 2), like every other azfs error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="azfs", description="azfs: virtual folders and datasets for compute clusters")
    parser.add_argument("--version", action="version", version=f"azfs {__version__}")
    parser.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(logging.DEBUG if args.debug else logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"azfs: {redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except AzfsError as exc:
        print(f"azfs: {redact(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("azfs: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the edge: no traceback for users
        if args.debug:
            raise
        logging.getLogger("azfs").debug("unexpected error", exc_info=True)
        print(f"azfs: internal error: {redact(str(exc)) or type(exc).__name__}"
              " (run with --debug for details)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
