"""A real Azurite blob endpoint for tests: free loopback port, own data dir.

Use the fixtures by importing them into a test module::

    from tests.support.azurite import azurite  # noqa: F401  (module-scoped)
    from tests.support.azurite import azurite_fn  # noqa: F401  (one per test)

Both yield an :class:`Azurite` with the well-known development account, its
key, the blob endpoint URL and a connection string, plus ``stop()`` and
``start()`` (same port, same data) for restart tests.  The process is always
stopped when the fixture ends.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.services import (
    free_port,
    missing_service,
    port_open,
    stop_process,
    wait_until,
)

ACCOUNT = "devstoreaccount1"
#: The published development key of Azurite's default account (not a secret).
KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/"
       "K1SZFPTOtr/KBHBeksoGMGw==")
_REPO = Path(__file__).resolve().parents[2]


def azurite_binary() -> str:
    """``azurite-blob`` from PATH, else from the repository's node cache."""
    found = shutil.which("azurite-blob")
    if found:
        return found
    local = _REPO / ".cache" / "node" / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return str(local)
    missing_service("azurite-blob is not installed (run packaging/setup-env.sh --test)")


class Azurite:
    """One Azurite blob service process; restartable on the same port and data."""

    def __init__(self, workdir: Path, tls: tuple[Path, Path, Path] | None = None) -> None:
        """``tls``: (certificate, key, CA certificate) to serve HTTPS instead of HTTP."""
        self.workdir = workdir
        self.tls = tls
        self.data = workdir / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "azurite.log"
        self.port = free_port()
        self.account = ACCOUNT
        self.key = KEY
        self.proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def blob_endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/{self.account}"

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol={self.scheme};AccountName={self.account};"
                f"AccountKey={self.key};BlobEndpoint={self.blob_endpoint};")

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        cmd = [azurite_binary(), "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
               "--location", str(self.data), "--skipApiVersionCheck", "--silent",
               "--disableTelemetry"]
        if self.tls:
            cmd += ["--cert", str(self.tls[0]), "--key", str(self.tls[1])]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_until(lambda: port_open(self.port), 30, "azurite", self.proc, self.log)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def service_client(self):
        from azure.storage.blob import BlobServiceClient
        extra = {"connection_verify": str(self.tls[2])} if self.tls else {}
        return BlobServiceClient.from_connection_string(self.connection_string, **extra)

    def container_sas(self, container: str, *, seconds: float = 3600, permission: str = "rl",
                      start_offset: float = -300) -> str:
        """A container SAS signed with the account key (``permission`` like ``"rl"``)."""
        import datetime as dt

        from azure.storage.blob import ContainerSasPermissions, generate_container_sas
        now = dt.datetime.now(dt.UTC)
        return generate_container_sas(
            self.account, container, account_key=self.key,
            permission=ContainerSasPermissions.from_string(permission),
            start=now + dt.timedelta(seconds=start_offset),
            expiry=now + dt.timedelta(seconds=seconds))

    def container_url(self, container: str, prefix: str = "", sas: str | None = None) -> str:
        """``http://127.0.0.1:PORT/devstoreaccount1/CONTAINER[/PREFIX][?SAS]``."""
        url = f"{self.blob_endpoint}/{container}" + (f"/{prefix}" if prefix else "")
        return f"{url}?{sas}" if sas else url

    def upload(self, container: str, blobs: dict[str, bytes],
               metadata: dict[str, dict[str, str]] | None = None) -> None:
        """Creates ``container`` if needed and uploads ``blobs`` (name → bytes)."""
        from azure.core.exceptions import ResourceExistsError
        service = self.service_client()
        client = service.get_container_client(container)
        try:
            client.create_container()
        except ResourceExistsError:
            pass
        for name, data in blobs.items():
            client.upload_blob(name, data, overwrite=True,
                               metadata=(metadata or {}).get(name))


def azurite_server(tmp: Path | None = None) -> Iterator[Azurite]:
    """Starts Azurite in ``tmp`` (or a fresh temp dir) and always stops it."""
    own = tmp is None
    workdir = Path(tempfile.mkdtemp(prefix="azurite-")) if own else tmp
    server = Azurite(workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def azurite() -> Iterator[Azurite]:
    """An Azurite shared by the tests of one module (don't stop it in a test)."""
    yield from azurite_server()


@pytest.fixture
def azurite_fn() -> Iterator[Azurite]:
    """An Azurite of one's own, for tests that stop and restart it."""
    yield from azurite_server()


__all__ = ["ACCOUNT", "KEY", "Azurite", "azurite", "azurite_fn", "azurite_server"]
