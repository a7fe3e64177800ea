"""Parsing the source URL of a blob dataset.

Two forms are accepted, each with an optional prefix and SAS query:

* ``https://ACCOUNT.blob.core.windows.net/CONTAINER[/PREFIX][?SAS]`` (the
  account is the first label of the host; any ``*.blob.*`` host works, so
  sovereign clouds do too);
* ``http://127.0.0.1:PORT/ACCOUNT/CONTAINER[/PREFIX][?SAS]`` (path style, as
  served by Azurite and other emulators: any host that is an IP address,
  ``localhost`` or not a ``*.blob.*`` name).

The SAS never appears in ``repr``/``str`` of the result.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass

from azfs.errors import UserError
from azfs.secret import Secret

_CONTAINER = re.compile(r"^(?:\$root|[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62})$")
_ACCOUNT = re.compile(r"^[a-z0-9]{3,24}$")


@dataclass(frozen=True, slots=True)
class BlobSource:
    """A container (or a prefix of it) and how to reach it.

    ``account_url`` ends without a slash; ``prefix`` is ``""`` or ends with
    ``/``; ``sas`` is the query string without ``?`` (or ``None``).
    """

    account_url: str
    account: str
    container: str
    prefix: str = ""
    sas: Secret | None = None

    @property
    def container_url(self) -> str:
        return f"{self.account_url}/{self.container}"

    @property
    def display(self) -> str:
        """The URL without its SAS, for logs and error messages."""
        return f"{self.container_url}/{self.prefix}"

    def with_sas(self, sas: Secret | str | None) -> BlobSource:
        return BlobSource(self.account_url, self.account, self.container, self.prefix,
                          Secret(normalize_sas(sas)) if sas else None)


def normalize_sas(value: Secret | str) -> str:
    """A SAS given as ``?sv=..``, ``sv=..`` or a full SAS URL, as a bare query string."""
    text = value.reveal() if isinstance(value, Secret) else str(value)
    text = text.strip()
    if "://" in text:
        text = urllib.parse.urlsplit(text).query
    text = text.lstrip("?")
    if not text:
        raise UserError("the SAS is empty")
    fields = urllib.parse.parse_qs(text, keep_blank_values=True)
    if "sig" not in fields:
        raise UserError("the SAS has no signature (sig=...)")
    return text


def _path_style(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        pass
    return host == "localhost" or ".blob." not in host


def parse_blob_url(url: str) -> BlobSource:
    """Parses a container/prefix URL; raises :class:`UserError` with the reason."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError("a blob source must be an http(s):// URL of a container")
    if parts.fragment:
        raise UserError("a blob source URL must not have a #fragment")
    host = parts.hostname
    segments = urllib.parse.unquote(parts.path).split("/")[1:]
    base = f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}"
    if _path_style(host):
        if not segments or not segments[0]:
            raise UserError("path-style blob URLs need /ACCOUNT/CONTAINER")
        account = segments.pop(0)
        base = f"{base}/{account}"
    else:
        account = host.split(".", 1)[0]
    if not _ACCOUNT.match(account):
        raise UserError(f"{account!r} is not a storage account name")
    if not segments or not segments[0]:
        raise UserError("the blob source URL names no container")
    container = segments.pop(0)
    if not _CONTAINER.match(container):
        raise UserError(f"{container!r} is not a valid container name "
                        "(3-63 of a-z, 0-9 and single '-')")
    parts_left = [s for s in segments if s]
    if any(s in (".", "..") for s in parts_left):
        raise UserError("the prefix must not contain '.' or '..' components")
    prefix = "".join(f"{s}/" for s in parts_left)
    sas = Secret(normalize_sas(parts.query)) if parts.query else None
    return BlobSource(base, account, container, prefix, sas)
