"""The manager's REST API from the CLI: one client, and table or ``--json`` output.

Shared by the ``azfs`` commands that talk to ``azfs-managerd`` (folder,
kernel, user, the dataset catalog).  The manager is ``--url`` or
``$AZFS_MANAGER_URL``; the token comes from ``--token-file`` or
``$AZFS_TOKEN`` (never a flag value, so it stays out of ``ps``).  Over
``https://`` the manager's certificate and host name are always verified:
against ``--ca-file`` or ``$AZFS_CA_FILE`` (a cluster's own CA), else the
system's trust; there is no switch to turn verification off.  API errors
become one-line :class:`UserError` messages ending in the API's stable code.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from rich.console import Console
from rich.table import Table

from azfs.errors import UserError
from azfs.secret import Secret, redact

DEFAULT_URL = "http://127.0.0.1:8630"


class ManagerClient:
    """A thin synchronous client of the manager; API errors become :class:`UserError`."""

    def __init__(self, url: str, token: Secret | None, timeout: float = 60.0,
                 ca_file: str | Path | None = None) -> None:
        from azfs.tls import client_context

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token.reveal()}"} if token else {}
        verify = client_context(ca_file, what="manager TLS") \
            if self.url.startswith("https://") else True
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout,
                                  verify=verify)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ManagerClient:
        url = args.url or os.environ.get("AZFS_MANAGER_URL") or DEFAULT_URL
        if not url.startswith(("http://", "https://")):
            raise UserError(f"manager URL must start with http:// or https:// (got {url!r})")
        token: Secret | None = None
        if args.token_file:
            try:
                token = Secret(Path(args.token_file).read_text().strip())
            except OSError as exc:
                raise UserError(f"cannot read token file {args.token_file}: "
                                f"{exc.strerror}") from None
        elif os.environ.get("AZFS_TOKEN"):
            token = Secret(os.environ["AZFS_TOKEN"].strip())
        if not token:
            raise UserError("no API token: set AZFS_TOKEN or pass --token-file")
        return cls(url, token, ca_file=getattr(args, "ca_file", None))

    def call(self, method: str, path: str, body: Any = None,
             params: dict[str, Any] | None = None) -> Any:
        try:
            response = self._http.request(method, path, json=body, params=params)
        except httpx.ConnectError as exc:
            reason = redact(str(exc)) or type(exc).__name__
            if "CERTIFICATE_VERIFY_FAILED" in reason:
                reason = (f"its TLS certificate is not trusted ({reason}); give the cluster's "
                          "CA with --ca-file or $AZFS_CA_FILE")
            raise UserError(f"cannot reach the manager at {self.url}: {reason}") from None
        except httpx.HTTPError as exc:
            raise UserError(f"cannot reach the manager at {self.url}: "
                            f"{redact(str(exc)) or type(exc).__name__}") from None
        if response.status_code == 204:
            return None
        try:
            data = response.json()
        except ValueError:
            raise UserError(f"the manager answered {response.status_code} "
                            "with something that is not JSON") from None
        if response.status_code >= 400:
            error = data.get("error", {}) if isinstance(data, dict) else {}
            raise UserError(f"{error.get('message', 'request failed')} "
                            f"[{error.get('code', response.status_code)}]")
        return data


def ref_path(ref: str) -> str:
    return quote(ref, safe="")


def add_client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help=f"manager URL (default $AZFS_MANAGER_URL or {DEFAULT_URL})")
    parser.add_argument("--token-file", help="file holding the API token (default $AZFS_TOKEN)")
    parser.add_argument("--ca-file", help="CA certificate(s) that signed the manager's TLS "
                                          "certificate (default $AZFS_CA_FILE, else the "
                                          "system's trust)")
    parser.add_argument("--json", action="store_true", help="print the API's JSON")


def emit(args: argparse.Namespace, data: Any, columns: list[tuple[str, str]],
         title: str | None = None) -> None:
    """Prints ``data`` (a dict or a list of dicts) as JSON or as a table."""
    try:
        _emit(args, data, columns, title)
    except BrokenPipeError:  # e.g. `azfs folder ls --json | head`: not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _emit(args: argparse.Namespace, data: Any, columns: list[tuple[str, str]],
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


def emit_record(args: argparse.Namespace, data: dict, fields: list[tuple[str, str]]) -> None:
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


def write_secret(path: str | Path, text: str) -> Path:
    """Writes a token or SAS to ``path``, mode 0600 from its creation; returns the path."""
    from azfs.node.layout import write_file

    target = Path(path)
    try:
        write_file(target, text.rstrip("\n") + "\n", 0o600)
    except OSError as exc:
        raise UserError(f"cannot write {target}: {exc.strerror}") from None
    return target


def print_json(data: Any) -> None:
    """One JSON document on stdout (for answers that are not API records)."""
    print(json.dumps(data, indent=2))


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: str, what: str) -> str:
    """The manager's rule for user and dataset names, checked before any request.

    A name with a '/' would otherwise reach a different route and come back
    as a puzzling 'not found'.
    """
    if not _NAME_RE.match(name):
        raise UserError(f"bad {what} {name!r}: 1-64 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit [invalid-argument]")
    return name
