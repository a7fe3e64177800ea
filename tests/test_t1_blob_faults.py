"""Blob backend faults against a real Azurite: SAS expiry/renewal/forgery, replaced
blobs, and the endpoint going away during a read.

Azurite validates SAS signatures and expiry times itself, so the expired and
forged cases are refused by the service, not by azfs.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random

import pytest
import trio

from azfs.backends.blob import BlobBackend, BlobOptions
from azfs.blob.prefetch import PrefetchBudget
from azfs.blob.sas import sas_expiry
from azfs.errors import AccessDenied, BackendUnavailable, StaleObject, TemporaryFailure
from azfs.retry import RetryPolicy
from azfs.secret import Secret
from tests.support.azurite import azurite, azurite_fn  # noqa: F401
from tests.support.poll import until
from tests.support.sas_source import SasSource

KiB = 1024
MiB = 1024 * KiB
BLOCK = 256 * KiB
DATA = random.Random(99).randbytes(3 * MiB)


def options(**kw) -> BlobOptions:
    return BlobOptions(block_size=BLOCK, max_window=2, **kw)


@pytest.fixture(scope="module")
def dataset(azurite):  # noqa: F811
    azurite.upload("faults", {"data.bin": DATA, "other.bin": DATA[:1000]})
    return azurite


def forge(sas: str) -> str:
    """The same SAS with a different (validly encoded) signature."""
    fields = dict(part.split("=", 1) for part in sas.split("&"))
    fields["sig"] = "A" * 43 + "%3D"
    return "&".join(f"{k}={v}" for k, v in fields.items())


async def open_file(backend: BlobBackend, name: str):
    node, _ = await backend.lookup(backend.root(), name)
    return await backend.open(node, os.O_RDONLY)


async def test_sas_is_renewed_ahead_of_expiry_while_a_file_is_open(dataset):
    """A SAS valid for a few seconds is replaced before it expires; reads go on."""
    short = dataset.container_sas("faults", seconds=4)
    fresh = dataset.container_sas("faults", seconds=3600)
    issued: list[str] = []

    def token_source() -> str:
        issued.append("x")
        return fresh

    backend = BlobBackend.from_url(dataset.container_url("faults", sas=short),
                                   token_source=token_source,
                                   options=options(renew_before=2.0))
    await backend.start()
    try:
        fh = await open_file(backend, "data.bin")
        assert await backend.read(fh, 0, 1000) == DATA[:1000]
        await until(lambda: backend.sas.renewals == 1, timeout=30, what="a renewal")
        assert issued
        assert backend.sas.current == Secret(fresh)
        expiry = sas_expiry(short)
        await until(lambda: dt.datetime.now(dt.UTC) > expiry, timeout=30,
                    what="the first SAS's expiry")
        assert await backend.read(fh, 2 * MiB, 4 * KiB) == DATA[2 * MiB:2 * MiB + 4 * KiB]
        await backend.release(fh)
    finally:
        await backend.close()


async def test_failed_probe_keeps_the_current_sas(dataset, caplog):
    good = dataset.container_sas("faults")
    backend = BlobBackend.from_url(dataset.container_url("faults", sas=good),
                                   token_source=lambda: forge(good), options=options())
    await backend.start()
    try:
        assert not await backend.sas.renew("test")
        assert backend.sas.current == Secret(good)
        assert backend.sas.failed_renewals == 1
        fh = await open_file(backend, "other.bin")
        assert await backend.read(fh, 0, 2000) == DATA[:1000]
        await backend.release(fh)
        assert "keeping the current SAS" in caplog.text
        assert "sig=" not in caplog.text.replace("sig=***", "")
    finally:
        await backend.close()


async def test_expired_sas_gives_access_denied_and_a_log_line(dataset, caplog):
    caplog.set_level(logging.ERROR, logger="azfs")
    short = dataset.container_sas("faults", seconds=2)
    backend = BlobBackend.from_url(dataset.container_url("faults", sas=short),
                                   options=options())
    await backend.start()
    try:
        fh = await open_file(backend, "data.bin")
        assert await backend.read(fh, 0, 100) == DATA[:100]
        await until(backend.sas.expired, timeout=30, what="the SAS expiring")
        with pytest.raises(AccessDenied, match="expired"):
            await backend.read(fh, MiB, 100)
        assert "expired" in caplog.text and "EACCES" in caplog.text
        # the backend is still alive: a fresh SAS from the source makes reads work again
        backend.sas._source = lambda: dataset.container_sas("faults")
        assert await backend.read(fh, MiB, 100) == DATA[MiB:MiB + 100]
        await backend.release(fh)
    finally:
        await backend.close()


async def test_expired_sas_at_start_is_refused(dataset):
    expired = dataset.container_sas("faults", seconds=-60)
    backend = BlobBackend.from_url(dataset.container_url("faults", sas=expired),
                                   options=options())
    with pytest.raises(AccessDenied):
        await backend.start()


async def test_forged_sas_is_refused(dataset):
    forged = forge(dataset.container_sas("faults"))
    backend = BlobBackend.from_url(dataset.container_url("faults", sas=forged),
                                   options=options())
    with pytest.raises(AccessDenied) as info:
        await backend.start()
    assert "AAAA" not in str(info.value)


async def test_sas_file_is_reread_on_renewal(dataset, tmp_path):
    sas_file = tmp_path / "sas"
    sas_file.write_text(dataset.container_sas("faults", seconds=3600) + "\n")
    backend = BlobBackend.from_url(dataset.container_url("faults"), sas_file=sas_file,
                                   options=options())
    await backend.start()
    try:
        newer = dataset.container_sas("faults", seconds=7200)
        sas_file.write_text(newer)
        assert await backend.sas.renew("test")
        assert backend.sas.current == Secret(newer)
    finally:
        await backend.close()


async def test_blob_replaced_mid_read_is_stale_never_mixed(dataset):
    dataset.upload("faults", {"replaced.bin": DATA})
    backend = BlobBackend.from_url(
        dataset.container_url("faults", sas=dataset.container_sas("faults")),
        options=options(), budget=PrefetchBudget(64 * MiB))
    await backend.start()
    try:
        fh = await open_file(backend, "replaced.bin")
        assert await backend.read(fh, 0, 64 * KiB) == DATA[:64 * KiB]
        new = bytes(reversed(DATA))
        dataset.upload("faults", {"replaced.bin": new})
        with pytest.raises(StaleObject):
            await backend.read(fh, 2 * MiB, 64 * KiB)
        # the handle stays stale, even for ranges fetched before the change
        with pytest.raises(StaleObject):
            await backend.read(fh, 0, 100)
        await backend.release(fh)
        fh = await open_file(backend, "replaced.bin")
        assert await backend.read(fh, 2 * MiB, 64 * KiB) == new[2 * MiB:2 * MiB + 64 * KiB]
        await backend.release(fh)
        assert backend.budget.used == 0
    finally:
        await backend.close()


async def test_endpoint_restarted_during_a_read_is_retried(azurite_fn):  # noqa: F811
    azurite_fn.upload("restart", {"data.bin": DATA})
    backend = BlobBackend.from_url(
        azurite_fn.container_url("restart", sas=azurite_fn.container_sas("restart")),
        options=options(policy=RetryPolicy(deadline=30, attempt_timeout=5),
                        socket_timeout=5))
    await backend.start()
    try:
        fh = await open_file(backend, "data.bin")
        assert await backend.read(fh, 0, 4 * KiB) == DATA[:4 * KiB]
        await trio.to_thread.run_sync(azurite_fn.stop)

        async def restart_soon() -> None:
            await trio.sleep(1.5)
            await trio.to_thread.run_sync(azurite_fn.start)

        with trio.fail_after(60):  # a hang guard, not a timing assertion
            async with trio.open_nursery() as nursery:
                nursery.start_soon(restart_soon)
                got = bytearray()
                while len(got) < len(DATA):
                    got += await backend.read(fh, len(got), 128 * KiB)
        assert bytes(got) == DATA
        await backend.release(fh)
    finally:
        await backend.close()


async def test_dead_endpoint_gives_eio_within_the_deadline(azurite_fn):  # noqa: F811
    azurite_fn.upload("dead", {"data.bin": DATA})
    backend = BlobBackend.from_url(
        azurite_fn.container_url("dead", sas=azurite_fn.container_sas("dead")),
        options=options(policy=RetryPolicy(deadline=2, attempt_timeout=1),
                        socket_timeout=1))
    await backend.start()
    try:
        fh = await open_file(backend, "data.bin")
        await trio.to_thread.run_sync(azurite_fn.stop)
        with trio.fail_after(30):  # a hang guard, not a timing assertion
            with pytest.raises(BackendUnavailable):
                await backend.read(fh, MiB, 4 * KiB)
            with pytest.raises(BackendUnavailable):
                await backend.http.list_level("")
        await backend.release(fh)
    finally:
        await backend.close()


async def test_blob_deleted_while_open_is_stale(dataset):
    dataset.upload("faults", {"deleted.bin": DATA})
    backend = BlobBackend.from_url(
        dataset.container_url("faults", sas=dataset.container_sas("faults")),
        options=options())
    await backend.start()
    try:
        fh = await open_file(backend, "deleted.bin")
        assert await backend.read(fh, 0, 100) == DATA[:100]
        dataset.service_client().get_blob_client("faults", "deleted.bin").delete_blob()
        with pytest.raises(StaleObject):
            await backend.read(fh, MiB, 100)
        await backend.release(fh)
    finally:
        await backend.close()


async def test_url_token_source_reads_json_and_classifies_failures(dataset):
    """The manager's form: JSON ``{"sas": ...}``; unreachable is temporary, never the URL."""
    from azfs.blob.sas import url_token_source

    fresh = dataset.container_sas("faults", seconds=7200)
    source = SasSource(fresh).start()
    try:
        assert await url_token_source(source.url)() == Secret(fresh)
        port = source.port
    finally:
        source.stop()
    dead = url_token_source(f"http://127.0.0.1:{port}/sas?key=kernel-key", timeout=2)
    with pytest.raises(TemporaryFailure, match="did not answer") as info:
        await dead()
    assert "kernel-key" not in str(info.value)


async def test_sas_renewal_outlives_an_outage_of_the_sas_source(dataset, tmp_path, caplog):
    """The product's path: the node's FUSE host builds the backend from ``sas_url``.

    The source serves a SAS whose renewal is due in a few seconds, goes down
    (connections refused) when renewal starts, and comes back later with a
    fresh SAS: the renewer keeps retrying through the outage and swaps it in.
    """
    from agentd.views import FuseHost
    from azfs.backends.blob import BlobOptions as Defaults
    from azfs.fs.operations import AzfsOperations

    renew_before = Defaults().renew_before  # the fusehost uses the default options
    short = dataset.container_sas("faults", seconds=renew_before + 3)
    fresh = dataset.container_sas("faults", seconds=7200)
    source = SasSource(short).start()
    host = FuseHost(AzfsOperations(), tmp_path)
    try:
        shared = await host._backend_for({"kind": "blob", "url": dataset.container_url("faults"),
                                          "sas_url": source.url}, ("kernels", "k1", "ds"))
        backend = shared.backend
        assert backend.sas.current == Secret(short)
        source.stop()
        await until(lambda: backend.sas.failed_renewals >= 2, timeout=30,
                    what="renewal attempts while the source is down")
        assert backend.sas.current == Secret(short)
        source.sas = fresh
        source.start()
        await until(lambda: backend.sas.current == Secret(fresh), timeout=60,
                    what="the fresh SAS after the source came back")
        fh = await open_file(backend, "other.bin")
        assert await backend.read(fh, 0, 10) == DATA[:10]
        await backend.release(fh)
        assert "background task failed" not in caplog.text
        assert "kernel-key" not in caplog.text
    finally:
        await host.close_all()
        source.stop()


async def test_a_token_pool_asks_the_newest_kernel_first_and_never_a_removed_one(dataset):
    """One backend for every kernel of a dataset, renewing through the kernels still there."""
    from azfs.blob.sas import TokenPool, url_token_source

    first = SasSource(dataset.container_sas("faults")).start()
    second = SasSource(dataset.container_sas("faults", seconds=7200)).start()
    try:
        pool = TokenPool()
        pool.add(("k1",), url_token_source(first.url))
        pool.add(("k2",), url_token_source(second.url))
        assert Secret(await pool()) == Secret(second.sas) and first.requests == 0
        second.stop()  # the newest kernel's renewal URL fails: the next one answers
        assert Secret(await pool()) == Secret(first.sas)
        pool.remove(("k1",))
        with pytest.raises(TemporaryFailure):  # only the failing source is left
            await pool()
        assert first.requests == 1
        pool.remove(("k2",))
        with pytest.raises(AccessDenied, match="no kernel"):
            await pool()
    finally:
        first.stop()
        second.stop()
