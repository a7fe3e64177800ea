"""Runs an :class:`AzfsOperations` filesystem: mount, serve, unmount.

Owns the lifecycle: one root nursery, background tasks (housekeeping,
cache invalidation) next to ``pyfuse3.main``, SIGTERM/SIGINT handled once
here by ending the main loop, and a ``finally`` that unmounts and lets every
backend persist its state, whatever ended the loop.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import pyfuse3
import trio

from azfs.backends.base import Backend
from azfs.fs.operations import AzfsOperations
from azfs.volumes.mountinfo import find_mount

log = logging.getLogger("azfs.fs")

FSNAME = "azfs"
#: kernel read-ahead of the FUSE mount: with the default 128 KiB, one sequential
#: reader keeps a single request in flight; 1 MiB keeps several (measured in bench/).
READ_AHEAD_KB = 1024


def mount_options(extra: Iterable[str] = (), allow_other: bool = True) -> set[str]:
    """``allow_other`` (containers run as another uid; off for a mount that is the
    mounting user's alone), kernel permission checks."""
    options = set(pyfuse3.default_options)
    options |= {"default_permissions", f"fsname={FSNAME}", f"subtype={FSNAME}"}
    if allow_other:
        options.add("allow_other")
    options |= set(extra)
    return options


def raise_fd_limit() -> None:
    """Every cached inode holds a descriptor: allow as many as the system does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard
    try:
        with open("/proc/sys/fs/nr_open") as f:
            want = max(hard, int(f.read()))
    except (OSError, ValueError):
        pass
    for limit in (want, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            return
        except (ValueError, OSError):
            continue


async def serve(ops: AzfsOperations, mountpoint: str | Path, backends: list[Backend], *,
                extra_options: Iterable[str] = (), allow_other: bool = True,
                on_ready: Callable[[], None] | None = None,
                tasks: Iterable[Callable[[], Awaitable[None]]] = ()) -> None:
    """Mounts ``ops`` at ``mountpoint`` and serves until unmounted or signalled."""
    started: list[Backend] = []
    try:
        for backend in backends:
            await backend.start()
            started.append(backend)
        pyfuse3.init(ops, str(mountpoint), mount_options(extra_options, allow_other))
        mounted = True
    except BaseException:
        for backend in started:
            await backend.close()
        raise
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_on_signals)
            nursery.start_soon(ops.run_housekeeping)
            nursery.start_soon(ops.run_invalidator)
            nursery.start_soon(_tune_after_init, mountpoint)
            for task in tasks:
                nursery.start_soon(task)
            if on_ready is not None:
                on_ready()
            log.info("serving %s", mountpoint)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        if mounted:
            with trio.CancelScope(shield=True):
                try:
                    pyfuse3.close(unmount=True)
                except Exception:  # noqa: BLE001 - already unmounted by someone else
                    log.debug("close after unmount", exc_info=True)
                for backend in started:
                    try:
                        await backend.close()
                    except Exception:  # noqa: BLE001 - one backend must not stop the others
                        log.exception("closing a backend failed")
        log.info("unmounted %s", mountpoint)


def tune_read_ahead(mountpoint: str | Path, kb: int = READ_AHEAD_KB) -> None:
    """Sets the mount's read-ahead (best effort: /sys may be read-only in a container).

    The device number comes from the mount table: a stat of the mountpoint would
    be a FUSE request to this very process, which is not serving yet.
    """
    entry = find_mount(os.path.abspath(mountpoint))
    if entry is None or not entry.device:
        return
    try:
        with open(f"/sys/class/bdi/{entry.device}/read_ahead_kb", "w") as f:
            f.write(str(kb))
    except OSError as exc:
        log.debug("cannot set read-ahead of %s: %s", mountpoint, exc)


async def _tune_after_init(mountpoint: str | Path) -> None:
    # the kernel sets the read-ahead when it gets the answer to FUSE_INIT
    await trio.sleep(0.5)
    await trio.to_thread.run_sync(tune_read_ahead, mountpoint)


async def _on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return
