"""A host volume's worker threads, deadlines and health (azfs.volumes.io), in-process.

The calls are real blocking functions in real threads: a ``threading.Event``
that is never set stands in for a system call stuck on a dead share.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import trio

from azfs.errors import BackendUnavailable
from azfs.volumes.io import (
    IOLimits,
    Kind,
    VolumeDegraded,
    VolumeIO,
    VolumeTimeout,
    fstype_of_fd,
    fstype_of_path,
)

FAST = IOLimits(threads=4, metadata_deadline=0.3, data_deadline=0.5, backoff=0.1,
                probe_interval=0.05, probe_deadline=0.2, mode="threads")


async def wait_for(predicate, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def test_calls_run_in_the_volumes_threads_and_return_results_and_errors():
    io = VolumeIO("v", FAST)
    names = await io.run(Kind.METADATA, lambda: threading.current_thread().name)
    assert names.startswith("io-v")
    with pytest.raises(FileNotFoundError):
        await io.run(Kind.METADATA, os.stat, "/nonexistent/azfs-test")
    stats = io.stats()
    assert stats["calls"] == 2 and stats["in_flight"] == 0 and stats["state"] == "healthy"


async def test_inline_volume_calls_on_the_loop_unless_blocking():
    io = VolumeIO("local", FAST, inline=True)
    main = threading.current_thread().name
    assert await io.run(Kind.METADATA, lambda: threading.current_thread().name) == main
    assert await io.run(Kind.DATA, lambda: threading.current_thread().name,
                        blocking=True) != main


async def test_a_stuck_call_times_out_degrades_the_volume_and_recovers():
    gate = threading.Event()
    probe_ok = threading.Event()
    io = VolumeIO("v", FAST, probe=lambda: probe_ok.wait() or None)
    with pytest.raises(VolumeTimeout) as exc:
        await io.run(Kind.METADATA, gate.wait)
    assert isinstance(exc.value, BackendUnavailable)
    assert io.state == "degraded" and io.stats()["stuck"] == 1
    # degraded: refused at once, without a thread
    start = time.monotonic()
    with pytest.raises(VolumeDegraded):
        await io.run(Kind.METADATA, time.sleep, 5)
    assert time.monotonic() - start < 0.2
    assert io.stats()["rejected"] == 1
    # the probe is stuck too: the volume stays degraded, one probe at a time
    await trio.sleep(0.5)
    assert io.state == "degraded"
    probe_ok.set()
    gate.set()
    await wait_for(lambda: io.state == "healthy")
    assert await io.run(Kind.METADATA, lambda: 42) == 42
    stats = io.stats()
    assert stats["stuck"] == 0 and stats["transitions"] == 2 and stats["timeouts"] == 1


async def test_a_late_result_is_cleaned_up_and_a_call_never_started_never_runs():
    limits = IOLimits(threads=1, metadata_deadline=0.3, backoff=60, mode="threads")
    io = VolumeIO("v", limits)
    gate = threading.Event()
    cleaned: list[str] = []
    ran: list[str] = []

    def slow() -> str:
        gate.wait()
        return "late"

    async def queued() -> None:
        with pytest.raises(VolumeTimeout):
            await io.run(Kind.METADATA, ran.append, "queued")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(queued)  # waits behind the stuck call in the only thread
        with pytest.raises(VolumeTimeout):
            await io.run(Kind.METADATA, slow, cleanup=cleaned.append)
    gate.set()
    await wait_for(lambda: cleaned == ["late"] and io.stats()["in_flight"] == 0)
    assert ran == []  # abandoned before a thread took it


async def test_stuck_threads_are_bounded_by_the_pool():
    limits = IOLimits(threads=3, metadata_deadline=0.2, backoff=60, mode="threads")
    io = VolumeIO("v", limits)
    gate = threading.Event()
    before = threading.active_count()

    async def call() -> None:
        with pytest.raises(BackendUnavailable):
            await io.run(Kind.METADATA, gate.wait)

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(call)
    assert io.stats()["threads"] <= 3
    assert threading.active_count() - before <= 3
    gate.set()
    await wait_for(lambda: io.stats()["running"] == 0)


async def test_concurrent_calls_overlap():
    io = VolumeIO("v", IOLimits(threads=8, mode="threads"))
    barrier = threading.Barrier(8, timeout=5)  # passes only if 8 calls run at once

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(io.run, Kind.DATA, barrier.wait)
    assert io.stats()["threads"] == 8


def test_limits_are_validated():
    for bad in ({"threads": 0}, {"metadata_deadline": 0}, {"data_deadline": -1},
                {"mode": "fast"}):
        with pytest.raises(ValueError):
            IOLimits(**bad)


def test_filesystem_type_comes_from_the_mount_table(tmp_path):
    fd = os.open(tmp_path, os.O_PATH)
    try:
        assert fstype_of_fd(fd) == fstype_of_path(str(tmp_path))
        assert fstype_of_path("/proc/self") == "proc"
    finally:
        os.close(fd)
