"""The I/O of one host volume: its own worker threads, a deadline per call, a health state.

One FUSE process serves every vfolder of a node, over every host volume of
the node, so a call that blocks on one volume (a hung SMB server leaves the
caller in state D) must never hold the event loop or another volume's
threads.  Each volume gets a :class:`VolumeIO`:

* calls run in the volume's own bounded pool of worker threads (created on
  demand, at most :attr:`IOLimits.threads`); many callers of a
  latency-bound share therefore overlap instead of queueing behind one;
* every call has a deadline; a call past it answers :class:`VolumeTimeout`
  (``ETIMEDOUT``) and the volume becomes *degraded*: further calls fail at
  once with :class:`VolumeDegraded` (``EIO``) while a probe in the background
  (one thread at most) decides when it is healthy again;
* a call abandoned at its deadline keeps its thread until the system call
  returns: stuck threads are counted, never multiplied, so a hung volume
  holds at most its own pool.  Whatever such a call produced late (a
  descriptor) is handed to its ``cleanup`` instead of being lost; a call
  abandoned before a thread took it is never run.

A volume on a local filesystem (ext4, xfs, tmpfs...) cannot stall on a
network, and a thread hop costs many times its system calls (bench/): such a
volume runs its calls inline (:attr:`IOLimits.mode` ``auto``), unless the
operator asks for threads.
"""

from __future__ import annotations

import enum
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import outcome
import trio

from azfs.errors import VolumeDegraded, VolumeTimeout
from azfs.volumes.mountinfo import read_mountinfo

log = logging.getLogger("azfs.volumes.io")

T = TypeVar("T")

#: filesystems whose calls never wait on a network (checked by the type of the mount)
LOCAL_FSTYPES = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "tmpfs", "ramfs", "overlay",
    "vfat", "exfat", "jfs", "reiserfs", "bcachefs",
})
#: latency histogram bounds in seconds (the same as the FUSE layer's)
BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
_IDLE_EXIT = 30.0


__all__ = ["IOLimits", "Kind", "VolumeDegraded", "VolumeIO", "VolumeTimeout"]


class Kind(enum.Enum):
    METADATA = "metadata"
    DATA = "data"


@dataclass(frozen=True)
class IOLimits:
    """Per-volume settings (``agent.toml`` ``[volume_io]``, ``azfs mount`` flags)."""

    #: worker threads of one volume
    threads: int = 32
    #: seconds a metadata call (lookup, getattr, readdir, create, rename...) may take
    metadata_deadline: float = 10.0
    #: seconds a data call (read, write, fsync, flush, release) may take
    data_deadline: float = 30.0
    #: seconds a degraded volume refuses calls before the first probe
    backoff: float = 2.0
    #: seconds between probes of a degraded volume, and a probe's own deadline
    probe_interval: float = 1.0
    probe_deadline: float = 5.0
    #: ``auto`` (inline on local filesystems, threads elsewhere), ``threads`` or ``inline``
    mode: str = "auto"

    def __post_init__(self) -> None:
        if not 1 <= self.threads <= 1024:
            raise ValueError("volume threads must be between 1 and 1024")
        for name in ("metadata_deadline", "data_deadline", "backoff", "probe_interval",
                     "probe_deadline"):
            if not 0 < getattr(self, name) <= 3600:
                raise ValueError(f"{name.replace('_', ' ')} must be > 0 and <= 3600 seconds")
        if self.mode not in ("auto", "threads", "inline"):
            raise ValueError("volume I/O mode must be auto, threads or inline")

    def deadline(self, kind: Kind) -> float:
        return self.data_deadline if kind is Kind.DATA else self.metadata_deadline


def fstype_of_fd(fd: int) -> str | None:
    """The filesystem type of the mount holding ``fd``, without a call to that filesystem.

    ``/proc/self/fdinfo`` names the mount id; the mount table names its type.
    """
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            mnt_id = next(int(line.split()[1]) for line in f if line.startswith("mnt_id:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    for entry in read_mountinfo():
        if entry.mount_id == mnt_id:
            return entry.fstype
    return None


def fstype_of_path(path: str) -> str | None:
    """The filesystem type of the mount holding ``path`` (from the mount table only)."""
    path = os.path.abspath(path)
    best: tuple[int, str] | None = None
    for entry in read_mountinfo():
        mp = entry.mount_point
        if path == mp or path.startswith(mp.rstrip("/") + "/"):
            if best is None or len(mp) >= best[0]:
                best = (len(mp), entry.fstype)
    return best[1] if best else None


class _Job:
    __slots__ = ("fn", "args", "task", "token", "cleanup", "lock", "state", "submitted")

    #: states: queued → running → done | abandoned (by the caller, at its deadline)
    def __init__(self, fn: Callable[..., Any], args: tuple, cleanup: Callable[[Any], None] | None
                 ) -> None:
        self.fn = fn
        self.args = args
        self.task = trio.lowlevel.current_task()
        self.token = trio.lowlevel.current_trio_token()
        self.cleanup = cleanup
        self.lock = threading.Lock()
        self.state = "queued"
        self.submitted = time.monotonic()


class VolumeIO:
    """Worker threads, deadlines and health of one host volume."""

    def __init__(self, name: str, limits: IOLimits | None = None,
                 probe: Callable[[], object] | None = None, inline: bool = False) -> None:
        self.name = name
        self.limits = limits or IOLimits()
        #: a cheap call that answers while the volume works (statvfs of its root)
        self.probe = probe
        self.inline = inline
        self.state = "healthy"
        self.since = time.time()
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._queued = 0
        #: counters (read by stats(); written under _lock from threads, or on the loop)
        self.calls = 0
        self.in_flight = 0
        self.running = 0
        self.stuck = 0
        self.timeouts = 0
        self.rejected = 0
        self.late_cleanups = 0
        self.transitions = 0
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.seconds = 0.0
        self._probe_running = False
        self._probe_limiter = trio.CapacityLimiter(1)

    @classmethod
    def for_fd(cls, name: str, fd: int, limits: IOLimits | None = None,
               probe: Callable[[], object] | None = None) -> VolumeIO:
        """A volume's I/O, inline or threaded by its mode and its filesystem's type."""
        limits = limits or IOLimits()
        if limits.mode == "auto":
            inline = fstype_of_fd(fd) in LOCAL_FSTYPES
        else:
            inline = limits.mode == "inline"
        return cls(name, limits, probe=probe, inline=inline)

    @classmethod
    def for_path(cls, name: str, root: str, limits: IOLimits | None = None) -> VolumeIO:
        """A host volume mounted at (or containing) ``root``; probed by its statvfs."""
        limits = limits or IOLimits()
        if limits.mode == "auto":
            inline = fstype_of_path(root) in LOCAL_FSTYPES
        else:
            inline = limits.mode == "inline"
        return cls(name, limits, probe=lambda: os.statvfs(root), inline=inline)

    # ---- calls ------------------------------------------------------------------------
    async def run(self, kind: Kind, fn: Callable[..., T], *args: Any,
                  cleanup: Callable[[T], None] | None = None, blocking: bool = False,
                  deadline: float | None = None) -> T:
        """``fn(*args)`` on this volume; its result, its exception, or a timeout error.

        ``cleanup(result)`` runs in the worker if the caller gave up on a call that
        then completed (so that a late descriptor or node is released).
        ``blocking`` calls (a ledger merge waiting for another daemon's lock, a
        tree walk) use a thread even on an inline volume.
        """
        if self.inline and not blocking:
            return fn(*args)
        if self.state != "healthy":
            self.rejected += 1
            raise VolumeDegraded(f"volume {self.name} is degraded (not answering)")
        if deadline is None:
            deadline = self.limits.deadline(kind)
        job = _Job(fn, args, cleanup)
        self.calls += 1
        self._submit(job)

        def abort(_: Any) -> trio.lowlevel.Abort:
            with job.lock:
                if job.state == "done":
                    return trio.lowlevel.Abort.FAILED  # the answer is on its way
                running = job.state == "running"
                job.state = "abandoned"
            if running:
                with self._lock:  # its thread stays busy until the system call returns
                    self.stuck += 1
            return trio.lowlevel.Abort.SUCCEEDED

        with trio.move_on_after(deadline):
            return await trio.lowlevel.wait_task_rescheduled(abort)
        self._timed_out(deadline)
        raise VolumeTimeout(f"volume {self.name} did not answer within {deadline:g} s")

    def _submit(self, job: _Job) -> None:
        with self._lock:
            self.in_flight += 1
            self._queued += 1
            spawn = self._queued > self._idle and self._threads < self.limits.threads
            if spawn:
                self._threads += 1
        self._queue.put(job)
        if spawn:
            threading.Thread(target=self._worker, name=f"io-{self.name}"[:15],
                             daemon=True).start()

    def _worker(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            try:
                job = self._queue.get(timeout=_IDLE_EXIT)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    if self._queued == 0:
                        self._threads -= 1
                        return
                continue
            with self._lock:
                self._idle -= 1
                self._queued -= 1
            self._execute(job)

    def _execute(self, job: _Job) -> None:
        with job.lock:
            if job.state == "abandoned":  # the caller gave up before it started
                with self._lock:
                    self.in_flight -= 1
                return
            job.state = "running"
        with self._lock:
            self.running += 1
        start = time.monotonic()
        try:
            result = outcome.Value(job.fn(*job.args))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller as is
            result = outcome.Error(exc)
        elapsed = time.monotonic() - start
        with job.lock:
            abandoned = job.state == "abandoned"
            job.state = "done"
        with self._lock:
            self.running -= 1
            self.in_flight -= 1
            self._observe(elapsed)
            if abandoned:
                self.stuck -= 1
        if not abandoned:
            job.token.run_sync_soon(trio.lowlevel.reschedule, job.task, result)
            return
        log.info("volume %s: a call abandoned at its deadline returned after %.1f s",
                 self.name, elapsed)
        if job.cleanup is not None and isinstance(result, outcome.Value):
            try:
                job.cleanup(result.value)
                with self._lock:
                    self.late_cleanups += 1
            except Exception:  # noqa: BLE001 - a worker must survive its cleanups
                log.exception("volume %s: cleanup of a late call failed", self.name)

    def _observe(self, seconds: float) -> None:
        self.seconds += seconds
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1
                return
        self.buckets[-1] += 1

    # ---- health ------------------------------------------------------------------------
    def _timed_out(self, deadline: float) -> None:
        self.timeouts += 1
        if self.state == "healthy":
            self.state = "degraded"
            self.since = time.time()
            self.transitions += 1
            log.warning("volume %s degraded: a call took more than %g s; its calls fail "
                        "at once until it answers again", self.name, deadline)
            trio.lowlevel.spawn_system_task(self._recover, name=f"probe {self.name}")

    async def _recover(self) -> None:
        """Probes the degraded volume until it answers and a worker is free again."""
        try:
            await trio.sleep(self.limits.backoff)
            while self.state != "healthy":
                if await self._probe_ok() and self.stuck < self.limits.threads:
                    self.state = "healthy"
                    self.since = time.time()
                    self.transitions += 1
                    log.warning("volume %s healthy again", self.name)
                    return
                await trio.sleep(self.limits.probe_interval)
        except trio.Cancelled:
            raise
        except Exception:  # noqa: BLE001 - a system task must never end the process
            log.exception("volume %s: probe loop failed", self.name)

    async def _probe_ok(self) -> bool:
        if self.probe is None:
            return True
        if self._probe_limiter.borrowed_tokens:
            return False  # the last probe is still stuck: one at a time
        with trio.move_on_after(self.limits.probe_deadline):
            try:
                await trio.to_thread.run_sync(self.probe, abandon_on_cancel=True,
                                              limiter=self._probe_limiter)
                return True
            except OSError as exc:
                log.debug("volume %s probe: %s", self.name, exc)
                return False
        return False

    def stats(self) -> dict[str, Any]:
        return {"state": self.state, "since": self.since, "mode":
                "inline" if self.inline else "threads", "threads": self._threads,
                "max_threads": self.limits.threads, "calls": self.calls,
                "in_flight": self.in_flight, "running": self.running, "stuck": self.stuck,
                "timeouts": self.timeouts, "rejected": self.rejected,
                "transitions": self.transitions, "seconds": self.seconds,
                "buckets": list(self.buckets)}


def probe_statvfs(fd: int) -> Callable[[], object]:
    """The usual probe: statvfs of a directory of the volume (the call SMB hangs in)."""
    return lambda: os.statvfs(fd)
