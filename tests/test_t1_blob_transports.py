"""The two HTTP transports of a blob backend, over plain HTTP and over TLS (real Azurite).

Small answers are read on the event loop (h11 over trio streams), large ones
in worker threads (``http.client``); both must give the same bytes, keep their
connections alive, recover from a server that closed an idle connection, and
speak TLS with certificate verification, as Blob Storage requires.
"""
# ruff: noqa: F811 - pytest fixtures are imported by name and requested by name

from __future__ import annotations

import os
import random
import socket

import pytest

from azfs.backends.blob import BlobBackend, BlobOptions
from azfs.blob.http import LOOP_MAX_BYTES
from azfs.errors import BackendUnavailable
from tests.support.azurite import Azurite, azurite  # noqa: F401
from tests.support.pki import CA
from tests.support.poll import until

MiB = 1024 * 1024
RNG = random.Random(11)
SMALL = RNG.randbytes(112 * 1024)
BIG = RNG.randbytes(5 * MiB)
#: blocks larger than the loop's limit: the big blob's blocks go through threads
OPTIONS = BlobOptions(block_size=2 * MiB)
assert OPTIONS.block_size > LOOP_MAX_BYTES >= len(SMALL)


def closed_by_peer(conn) -> bool:
    fd = getattr(conn.stream, "transport_stream", conn.stream).socket.fileno()
    with socket.socket(fileno=os.dup(fd)) as sock:
        try:
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False


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


async def check_both_transports(server: Azurite) -> BlobBackend:
    server.upload("both", {"small.bin": SMALL, "big.bin": BIG})
    backend = BlobBackend.from_url(server.container_url("both", sas=server.container_sas("both")),
                                   options=OPTIONS)
    await backend.start()
    try:
        assert await read_all(backend, "small.bin", len(SMALL)) == SMALL
        assert await read_all(backend, "big.bin", len(BIG)) == BIG
        http = backend.http
        assert http._loop._idle, "the small GET did not run on the event loop"
        assert http._pool, "the large blocks did not run in threads"
        # the server drops idle keep-alive connections (after 5 s, Azurite as Node does):
        # the next request finds its pooled connection closed and reconnects once
        await until(lambda: all(closed_by_peer(c) for c in http._loop._idle), timeout=60,
                    what="the server closing idle connections")
        before = http.data_gets
        node, _ = await backend.lookup(backend.root(), "small.bin")
        fh = await backend.open(node, os.O_RDONLY)
        try:
            # past the cached whole-blob fetch: a short range read of its own
            assert await backend.http.read_range("small.bin", 1000, 5000, "") == \
                SMALL[1000:6000]
        finally:
            await backend.release(fh)
        assert http.data_gets == before + 1
    finally:
        await backend.close()
    assert not backend.http._loop._idle and not backend.http._pool
    return backend


async def test_plain_http_small_answers_on_the_loop_large_in_threads(azurite) -> None:
    await check_both_transports(azurite)


async def test_tls_with_a_verified_certificate_on_both_transports(tmp_path, monkeypatch):
    ca = CA(tmp_path, "storage")
    cert = ca.issue("azurite")
    server = Azurite(tmp_path / "azurite", tls=(cert.cert, cert.key, ca.cert))
    server.start()
    try:
        # the daemon trusts what the system trusts; here, the test CA
        monkeypatch.setenv("SSL_CERT_FILE", str(ca.cert))
        backend = await check_both_transports(server)
        assert backend.http._ssl is not None
    finally:
        server.stop()


async def test_tls_to_an_untrusted_certificate_is_refused(tmp_path, monkeypatch) -> None:
    """Refused at once on both transports, with the reason (never retried as an outage)."""
    ca = CA(tmp_path, "storage")
    cert = ca.issue("azurite")
    server = Azurite(tmp_path / "azurite", tls=(cert.cert, cert.key, ca.cert))
    server.start()
    try:
        server.upload("both", {"small.bin": SMALL})
        other = CA(tmp_path, "other")  # the daemon trusts another CA only
        monkeypatch.setenv("SSL_CERT_FILE", str(other.cert))
        backend = BlobBackend.from_url(
            server.container_url("both", sas=server.container_sas("both")))
        with pytest.raises(BackendUnavailable, match="TLS to 127.0.0.1: .*certificate"):
            await backend.start()  # the SAS probe: on the event loop
        with pytest.raises(BackendUnavailable, match="TLS to 127.0.0.1: .*certificate"):
            await backend.http.read_range("small.bin", 0, LOOP_MAX_BYTES + 1, "")  # threads
        assert backend.http.requests == 0
        await backend.close()
    finally:
        server.stop()
