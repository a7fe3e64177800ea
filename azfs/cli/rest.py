"""The CLI's side of the manager's REST API: flags, the client they make, and output.

Shared by the ``azfs`` commands that talk to ``azfs-managerd`` (folder,
kernel, user, the dataset catalog).  The client itself and the calls built
on it are :mod:`azfs.client.manager`; this module turns flags into one and
re-exports the table/JSON output of :mod:`azfs.tables`.  The manager is
``--url`` or ``$AZFS_MANAGER_URL``; the token comes from ``--token-file`` or
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
from pathlib import Path
from typing import Any

from azfs.client.manager import DEFAULT_URL, ManagerClient, check_name, ref_path
from azfs.errors import UserError
from azfs.secret import Secret
from azfs.tables import emit, emit_record, human_bytes

__all__ = ["DEFAULT_URL", "ManagerClient", "add_client_flags", "check_name", "client_from_args",
           "emit", "emit_record", "human_bytes", "print_json", "ref_path", "write_secret"]


def client_from_args(args: argparse.Namespace) -> ManagerClient:
    """The client of ``--url``/``--token-file``/``--ca-file`` (or their environment)."""
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
    return ManagerClient(url, token, ca_file=getattr(args, "ca_file", None))


def add_client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help=f"manager URL (default $AZFS_MANAGER_URL or {DEFAULT_URL})")
    parser.add_argument("--token-file", help="file holding the API token (default $AZFS_TOKEN)")
    parser.add_argument("--ca-file", help="CA certificate(s) that signed the manager's TLS "
                                          "certificate (default $AZFS_CA_FILE, else the "
                                          "system's trust)")
    parser.add_argument("--json", action="store_true", help="print the API's JSON")


def write_secret(path: str | Path, text: str) -> Path:
    """Writes a token or SAS to ``path``, mode 0600 from its creation; returns the path."""
    from azfs.files import atomic_write

    target = Path(path)
    try:
        atomic_write(target, text.rstrip("\n") + "\n", 0o600)
    except OSError as exc:
        raise UserError(f"cannot write {target}: {exc.strerror}") from None
    return target


def print_json(data: Any) -> None:
    """One JSON document on stdout (for answers that are not API records)."""
    print(json.dumps(data, indent=2))
