"""API records as tables or JSON on stdout, for the CLI and ``azfs demo``.

``args`` is anything with a ``json`` attribute (the parsed ``--json`` flag).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Protocol

from rich.console import Console
from rich.table import Table


class JsonFlag(Protocol):
    """What the output helpers need of parsed arguments: the ``--json`` flag."""

    json: bool


def emit(args: JsonFlag, data: Any, columns: list[tuple[str, str]],
         title: str | None = None) -> None:
    """Prints ``data`` (a dict or a list of dicts) as JSON or as a table."""
    try:
        _emit(args, data, columns, title)
    except BrokenPipeError:  # e.g. `azfs folder ls --json | head`: not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _emit(args: JsonFlag, data: Any, columns: list[tuple[str, str]],
          title: str | None) -> None:
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    rows = data if isinstance(data, list) else [data]
    table = Table(title=title, show_lines=False)
    for _, header in columns:
        table.add_column(header, overflow="fold")  # wrap long ids, never cut them
    for row in rows:
        table.add_row(*(_cell(row, key) for key, _ in columns))
    Console().print(table)


def emit_record(args: JsonFlag, data: dict, fields: list[tuple[str, str]]) -> None:
    """One object as a vertical field/value table (or its JSON)."""
    if args.json:
        emit(args, data, fields)
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, header in fields:
        table.add_row(header, _cell(data, key))
    Console().print(table)


def _cell(row: dict, key: str) -> str:
    value: Any = row
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return "-"
    if key.endswith("bytes") and isinstance(value, int):
        return human_bytes(value) if value else ("unlimited" if "quota" in key else "0")
    if key == "quota_files" and value == 0:
        return "unlimited"
    if isinstance(value, list):
        return ", ".join(f"{v['user']}:{v['permission']}" if isinstance(v, dict) else str(v)
                         for v in value) or "-"
    return str(value)


def human_bytes(value: int) -> str:
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(value)
