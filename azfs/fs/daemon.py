"""Runs an :class:`AzfsOperations` filesystem: mount, serve, unmount.

Owns the lifecycle: one root nursery, background tasks (housekeeping,
cache invalidation) next to ``pyfuse3.main``, SIGTERM/SIGINT handled once
here by ending the main loop, and a ``finally`` that unmounts and lets every
backend persist its state, whatever ended the loop.
"""

from __future__ import annotations

import logging
import resource
import signal
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import pyfuse3
import trio

from azfs.backends.base import Backend
from azfs.fs.operations import AzfsOperations

log = logging.getLogger("azfs.fs")

FSNAME = "azfs"


def mount_options(extra: Iterable[str] = ()) -> set[str]:
    """``allow_other`` (containers run as another uid), kernel permission checks."""
    options = set(pyfuse3.default_options)
    options |= {"allow_other", "default_permissions", f"fsname={FSNAME}", f"subtype={FSNAME}"}
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
                extra_options: Iterable[str] = (),
                on_ready: Callable[[], None] | None = None,
                tasks: Iterable[Callable[[], Awaitable[None]]] = ()) -> None:
    """Mounts ``ops`` at ``mountpoint`` and serves until unmounted or signalled."""
    started: list[Backend] = []
    try:
        for backend in backends:
            await backend.start()
            started.append(backend)
        pyfuse3.init(ops, str(mountpoint), mount_options(extra_options))
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


async def _on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return
