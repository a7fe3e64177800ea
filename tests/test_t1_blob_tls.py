"""Blob reads over TLS, as Blob Storage requires (real Azurite serving HTTPS).

Azurite is given a certificate of a throwaway CA; the daemon verifies it
against what the system trusts (``SSL_CERT_FILE`` here). Small and large
reads give the same bytes, connections stay alive, a connection the server
closed while idle is replaced, and a certificate that does not verify is
refused at once with its reason.
"""

from __future__ import annotations

import os
import random

import pytest

from azfs.backends.blob import BlobBackend, BlobOptions
from azfs.errors import BackendUnavailable
from tests.support.azurite import Azurite
from tests.support.pki import CA
from tests.support.poll import until

MiB = 1024 * 1024
RNG = random.Random(11)
SMALL = RNG.randbytes(112 * 1024)
BIG = RNG.randbytes(5 * MiB)


@pytest.fixture
def tls_azurite(tmp_path):
    ca = CA(tmp_path, "storage")
    cert = ca.issue("azurite")
    server = Azurite(tmp_path / "azurite", tls=(cert.cert, cert.key, ca.cert))
    server.start()
    try:
        server.upload("tls", {"small.bin": SMALL, "big.bin": BIG})
        yield server, ca
    finally:
        server.stop()


async def read_all(backend: BlobBackend, name: str, size: int) -> bytes:
    node, attrs = await backend.lookup(backend.root(), name)
    assert attrs.size == size
    fh = await backend.open(node, os.O_RDONLY)
    try:
        out = bytearray()
        while len(out) < size:
            chunk = await backend.read(fh, len(out), 128 * 1024)
            assert chunk, f"{name}: read ended at {len(out)} of {size}"
            out += chunk
        return bytes(out)
    finally:
        await backend.release(fh)


def _closed_by_server(conn) -> bool:
    """An idle keep-alive connection with anything to read: the server is closing it
    (its TLS close_notify, then its FIN)."""
    import socket

    if conn.sock is None:
        return True
    with socket.socket(fileno=os.dup(conn.sock.fileno())) as raw:
        try:
            raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        return True


async def test_reads_over_tls_with_a_verified_certificate(tls_azurite, monkeypatch) -> None:
    server, ca = tls_azurite
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.cert))  # the system's trust, here the test CA
    backend = BlobBackend.from_url(server.container_url("tls", sas=server.container_sas("tls")),
                                   options=BlobOptions(block_size=2 * MiB))
    await backend.start()
    try:
        assert backend.http._ssl is not None
        assert await read_all(backend, "small.bin", len(SMALL)) == SMALL
        assert await read_all(backend, "big.bin", len(BIG)) == BIG
        pool = backend.http._pool
        assert pool, "no keep-alive connection was kept"
        # the server drops idle keep-alive connections (after 5 s, as Node does): the
        # next request finds its pooled connection closed and reconnects once
        await until(lambda: all(_closed_by_server(c) for c in pool), timeout=60,
                    what="the server closing idle connections")
        before = backend.http.data_gets
        assert await backend.http.read_range("small.bin", 1000, 5000, "") == SMALL[1000:6000]
        assert backend.http.data_gets == before + 1
    finally:
        await backend.close()


async def test_an_untrusted_certificate_is_refused_at_once(tls_azurite, tmp_path,
                                                           monkeypatch) -> None:
    server, _ = tls_azurite
    other = CA(tmp_path, "other")  # the daemon trusts another CA only
    monkeypatch.setenv("SSL_CERT_FILE", str(other.cert))
    backend = BlobBackend.from_url(server.container_url("tls", sas=server.container_sas("tls")))
    with pytest.raises(BackendUnavailable, match="TLS to 127.0.0.1: .*certificate"):
        await backend.start()
    assert backend.http.requests == 0
    await backend.close()
