"""Blob Storage with an account key: the SDK client, its errors, create and upload.

What ``azfs dataset`` (the CLI) and ``azfs up`` (its sample dataset) both do
to a storage account.  Keys travel in :class:`~azfs.secret.Secret`; SDK
errors become one-line :class:`~azfs.errors.UserError` messages passed
through :func:`~azfs.secret.redact`.  Remote calls go through
:mod:`azfs.retry` (the SDK's own retries are off).  An uploaded blob
records its source's mtime (metadata ``azfs_mtime``), so an upload redone
can skip what is unchanged (:func:`uploaded_versions`).
"""

from __future__ import annotations

import contextlib
import mimetypes
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from azfs.errors import UserError
from azfs.retry import RetryPolicy, retry_sync
from azfs.secret import Secret, redact

MiB = 1024 * 1024
SDK_OPTIONS: dict[str, Any] = {"retry_total": 0, "connection_timeout": 20,
                               "read_timeout": 120, "max_single_put_size": 8 * MiB,
                               "max_block_size": 8 * MiB}
POLICY = RetryPolicy(deadline=120)


@dataclass(frozen=True)
class Account:
    name: str
    key: Secret | None
    endpoint: str
    connection_string: Secret | None


def account_from_connection_string(cs: str, endpoint: str | None = None) -> Account:
    """The account of a connection string (``endpoint`` overrides its blob endpoint)."""
    fields = dict(part.split("=", 1) for part in cs.split(";") if "=" in part)
    name = fields.get("AccountName", "")
    if not name:
        raise UserError("the connection string has no AccountName")
    key = fields.get("AccountKey")
    endpoint = endpoint or fields.get("BlobEndpoint") or \
        f"{fields.get('DefaultEndpointsProtocol', 'https')}://{name}.blob." \
        f"{fields.get('EndpointSuffix', 'core.windows.net')}"
    return Account(name, Secret(key) if key else None, endpoint.rstrip("/"), Secret(cs))


def service_client(account: Account):
    from azure.storage.blob import BlobServiceClient
    if account.key is None:
        return BlobServiceClient.from_connection_string(
            account.connection_string.reveal(), **SDK_OPTIONS)  # type: ignore[union-attr]
    return BlobServiceClient(account.endpoint, credential={
        "account_name": account.name, "account_key": account.key.reveal()}, **SDK_OPTIONS)


@contextlib.contextmanager
def sdk_errors(what: str, container: str | None = None) -> Iterator[None]:
    """Turns the SDK's exceptions into one-line user errors without secrets."""
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ResourceExistsError,
        ResourceNotFoundError,
        ServiceRequestError,
    )
    try:
        yield
    except ResourceNotFoundError as exc:
        code = getattr(exc, "error_code", "") or ""
        if container and "Container" in str(code):
            raise UserError(f"{what}: container {container!r} does not exist "
                            f"(create it with 'azfs dataset create {container}')") from None
        raise UserError(f"{what}: not found ({code or 'no such blob'})") from None
    except ResourceExistsError:
        raise UserError(f"{what}: already exists") from None
    except ClientAuthenticationError:
        raise UserError(f"{what}: the storage service refused the credentials "
                        "(check the account key or SAS)") from None
    except ServiceRequestError as exc:
        raise UserError(f"{what}: cannot reach the storage service "
                        f"({redact(str(exc)).splitlines()[0][:200]})") from None
    except HttpResponseError as exc:
        if exc.status_code == 403:
            raise UserError(f"{what}: the storage service refused the credentials "
                            "(check the account key or SAS)") from None
        code = getattr(exc, "error_code", None) or exc.status_code
        raise UserError(f"{what}: the storage service answered "
                        f"{getattr(code, 'value', code)}") from None


def create_container(service, container: str) -> bool:
    """Creates ``container``; False if it existed already."""
    from azure.core.exceptions import ResourceExistsError

    from azfs.blob.url import _CONTAINER
    if not _CONTAINER.match(container):
        raise UserError(f"{container!r} is not a valid container name "
                        "(3-63 of a-z, 0-9 and single '-')")
    client = service.get_container_client(container)
    with sdk_errors(f"create {container}"):
        try:
            retry_sync(client.create_container, "create container", POLICY)
        except ResourceExistsError:
            return False
    return True


def uploaded_versions(client, prefix: str, container: str) -> dict[str, tuple[int, str]]:
    """Blob name → (size, recorded source mtime) under ``prefix`` of container ``client``."""
    versions: dict[str, tuple[int, str]] = {}
    with sdk_errors(f"list {container}/{prefix}", container):
        for b in client.list_blobs(name_starts_with=prefix or None, include=["metadata"]):
            versions[b.name] = (b.size, (b.metadata or {}).get("azfs_mtime", ""))
    return versions


def upload_file(client, blob: str, path: Path, size: int, mtime_ns: int, container: str, *,
                content_type: str | None = None,
                hook: Callable[[int, int | None], None] | None = None,
                restart: Callable[[], None] | None = None) -> None:
    """Uploads ``path`` as ``blob`` (whole or not at all), recording its mtime.

    ``restart`` is called before each attempt (a progress bar rewinds);
    ``hook`` gets the SDK's progress callbacks.
    """
    from azure.storage.blob import ContentSettings

    ctype = content_type or mimetypes.guess_type(blob)[0] or "application/octet-stream"

    def once() -> None:
        if restart is not None:
            restart()
        with open(path, "rb") as data:
            client.upload_blob(blob, data, length=size, overwrite=True,
                               content_settings=ContentSettings(content_type=ctype),
                               metadata={"azfs_mtime": str(mtime_ns)},
                               max_concurrency=4, progress_hook=hook)
    with sdk_errors(f"upload {path}", container):
        retry_sync(once, f"upload {blob}", POLICY)
