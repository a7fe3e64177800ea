"""Issuing read-only SAS tokens for datasets (container- or blob-scoped, short-lived).

The manager holds storage account keys (from files or the environment);
they never leave this module.  Tokens grant read (and list, for a container)
only, start a few minutes in the past to absorb clock skew, and expire
after at most the configured maximum.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, urlsplit

from azure.storage.blob import (
    BlobSasPermissions,
    ContainerSasPermissions,
    generate_blob_sas,
    generate_container_sas,
)

from azfs.secret import Secret

CLOCK_SKEW = timedelta(minutes=5)


@dataclass(frozen=True)
class IssuedSas:
    sas: str
    url: str
    expires_at: datetime
    scope: str


def account_name(account_url: str) -> str:
    """The account of a blob endpoint: the first host label, or the first path
    segment for path-style endpoints (Azurite, ``http://127.0.0.1:10000/ACCOUNT``)."""
    parts = urlsplit(account_url)
    path = parts.path.strip("/")
    if path:
        return path.split("/")[0]
    return (parts.hostname or "").split(".")[0]


def container_sas(account_url: str, container: str, key: Secret, ttl: int) -> IssuedSas:
    start, expiry = _window(ttl)
    sas = generate_container_sas(
        account_name(account_url), container, account_key=key.reveal(),
        permission=ContainerSasPermissions(read=True, list=True), start=start, expiry=expiry)
    url = f"{account_url.rstrip('/')}/{container}"
    return IssuedSas(sas, f"{url}?{sas}", expiry, "container")


def blob_sas(account_url: str, container: str, blob: str, key: Secret, ttl: int) -> IssuedSas:
    start, expiry = _window(ttl)
    sas = generate_blob_sas(
        account_name(account_url), container, blob, account_key=key.reveal(),
        permission=BlobSasPermissions(read=True), start=start, expiry=expiry)
    url = f"{account_url.rstrip('/')}/{container}/{quote(blob)}"
    return IssuedSas(sas, f"{url}?{sas}", expiry, "blob")


def _window(ttl: int) -> tuple[datetime, datetime]:
    now = datetime.now(UTC).replace(microsecond=0)
    return now - CLOCK_SKEW, now + timedelta(seconds=ttl)
