"""Incremental usage accounting (bytes, file count) and quota checks of a vfolder.

The ledger lives inside the vfolder's backing directory, under the reserved
name :data:`META_DIR` (hidden from and untouchable through the filesystem),
so it travels with the data and the manager can read it on its own mount of
the volume.  Invariants:

* ``bytes`` is the sum of apparent sizes of regular files, each inode counted
  once whatever its number of hard links; ``files`` counts inodes of every
  type (files, directories, symlinks, fifos) except the vfolder root.
* Several daemons may serve one vfolder at once (kernels on several nodes
  share a folder).  Each keeps its own unflushed *delta* and merges it into
  the shared record under an exclusive ``flock`` at most every
  :data:`FLUSH_INTERVAL` seconds; each registers as a *holder* with a
  heartbeat.  The record is ``clean`` when it has no holders.
* A holder that died without unregistering (its pid is gone on this host, or
  its heartbeat is older than :data:`STALE_AFTER` elsewhere) may have lost
  changes: the next daemon to load the ledger rebuilds it with one walk.
* Quota checks see the shared total as last merged plus this daemon's delta,
  and happen *before* the data is written, so a refused write wrote nothing.
* A read-only user of the ledger (an inspection mount) never writes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import stat
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from azfs.errors import QuotaExceeded

log = logging.getLogger(__name__)

META_DIR = ".azfs-meta"
LEDGER_NAME = "usage.json"
LOCK_NAME = "lock"
FLUSH_INTERVAL = 1.0
HEARTBEAT_INTERVAL = 5.0
#: a holder on another host whose heartbeat is older than this is taken as dead
STALE_AFTER = 60.0
LOCK_TIMEOUT = 10.0
LEDGER_VERSION = 2
_HOST = socket.gethostname()


@dataclass(slots=True)
class Quota:
    """Limits of a vfolder; 0 means unlimited."""

    bytes: int = 0
    files: int = 0

    def __post_init__(self) -> None:
        if self.bytes < 0 or self.files < 0:
            raise ValueError("quotas must be >= 0 (0 means unlimited)")


def _process_start(pid: int | str) -> str | None:
    """The start time of a live (not zombie) process, which tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]  # field 22 of proc(5), counted after the command name


def _holder_alive(holder: str, heartbeat: float, now: float) -> bool:
    """Holders are "host:pid:start:token"; on this host the process itself is checked."""
    host, pid_text, start, *_ = (holder.split(":") + ["", "", ""])[:4]
    if host == _HOST and pid_text.isdigit():
        return _process_start(pid_text) == start
    return now - heartbeat < STALE_AFTER


class UsageLedger:
    """Counters of one vfolder with quota enforcement and crash-safe, shared persistence."""

    def __init__(self, root_fd: int, quota: Quota | None = None,
                 read_only: bool = False) -> None:
        self._root_fd = root_fd
        self.quota = quota or Quota()
        self.read_only = read_only
        self.holder = (f"{_HOST}:{os.getpid()}:{_process_start(os.getpid())}:"
                       f"{uuid.uuid4().hex[:8]}")
        #: shared totals as last merged, and this daemon's changes since
        self._base_bytes = 0
        self._base_files = 0
        self._delta_bytes = 0
        self._delta_files = 0
        self._last_flush = 0.0
        self._last_refresh = 0.0
        self._registered = False
        #: deltas change in the volume's worker threads while a merge runs in another
        self._lock = threading.RLock()
        #: one merge at a time: a close() overlapping a housekeeping tick must not
        #: merge the same delta twice
        self._merge_lock = threading.Lock()

    @property
    def bytes(self) -> int:
        return max(0, self._base_bytes + self._delta_bytes)

    @property
    def files(self) -> int:
        return max(0, self._base_files + self._delta_files)

    # ---- loading -----------------------------------------------------------
    def load(self) -> bool:
        """Loads the ledger and registers as a holder; True when it had to be rebuilt."""
        if self.read_only:
            record = read_ledger_at(self._root_fd)
            if record is None:
                self._base_bytes, self._base_files = scan_usage(self._root_fd)
                return True
            self._base_bytes, self._base_files = int(record["bytes"]), int(record["files"])
            return False
        with self._locked():
            record = read_ledger_at(self._root_fd)
            now = time.time()
            holders = dict(record.get("holders", {})) if record else {}
            dead = [h for h, beat in holders.items() if not _holder_alive(h, beat, now)]
            for h in dead:
                del holders[h]
            rebuilt = record is None or bool(dead) or (not holders and not record.get("clean"))
            if rebuilt:
                b, f = scan_usage(self._root_fd)
                log.info("usage rebuilt by a scan: %d bytes, %d files", b, f)
            else:
                b, f = int(record["bytes"]), int(record["files"])
            holders[self.holder] = now
            self._store(b, f, holders)
            self._base_bytes, self._base_files = b, f
            self._registered = True
            self._last_flush = time.monotonic()
        return rebuilt

    # ---- quota and accounting ----------------------------------------------
    def check_bytes(self, growth: int) -> None:
        if growth > 0 and self.quota.bytes and self.bytes + growth > self.quota.bytes:
            raise QuotaExceeded(
                f"byte quota {self.quota.bytes} would be exceeded ({self.bytes} used)")

    def check_files(self, count: int = 1) -> None:
        if self.quota.files and self.files + count > self.quota.files:
            raise QuotaExceeded(
                f"file quota {self.quota.files} would be exceeded ({self.files} used)")

    def charge(self, bytes_delta: int = 0, files_delta: int = 0) -> None:
        """Checks the quotas and counts the change in one step.

        Calls run concurrently in worker threads: a check followed by a separate
        ``add`` would let two writers both pass a check that only one fits in.
        A charge that turns out too high is given back with :meth:`add`.
        """
        with self._lock:
            self.check_bytes(bytes_delta)
            if files_delta > 0:
                self.check_files(files_delta)
            self._add_locked(bytes_delta, files_delta)

    def add(self, bytes_delta: int = 0, files_delta: int = 0) -> None:
        with self._lock:
            self._add_locked(bytes_delta, files_delta)

    def _add_locked(self, bytes_delta: int, files_delta: int) -> None:
        # never let our view of the total go below zero (a drifted record)
        self._delta_bytes += max(bytes_delta, -self.bytes)
        self._delta_files += max(files_delta, -self.files)

    # ---- persistence -------------------------------------------------------
    def flush_if_due(self) -> None:
        if not self._registered:
            return
        now = time.monotonic()
        changed = self._delta_bytes or self._delta_files
        if (changed and now - self._last_flush >= FLUSH_INTERVAL) or \
                now - self._last_flush >= HEARTBEAT_INTERVAL:
            self._merge(unregister=False)
        elif (self.quota.bytes or self.quota.files) and \
                now - self._last_refresh >= FLUSH_INTERVAL:
            # idle under a quota: learn the other nodes' writes every second, so
            # that a write here after a pause is checked against a fresh total
            self._refresh()

    def _refresh(self) -> None:
        """Reads the shared totals (a record is replaced atomically: no lock needed)."""
        with self._merge_lock:
            record = read_ledger_at(self._root_fd)
            if record is not None:
                with self._lock:
                    self._base_bytes = int(record["bytes"])
                    self._base_files = int(record["files"])
            self._last_refresh = time.monotonic()

    def close(self) -> None:
        """Merges the last changes and unregisters (after the last write is done)."""
        if self._registered:
            self._merge(unregister=True)
            self._registered = False

    def _merge(self, unregister: bool) -> None:
        """Adds this daemon's deltas to the shared record (may run in a worker thread)."""
        with self._merge_lock:
            try:
                with self._locked():
                    # read under both locks: what is merged is exactly what is subtracted
                    with self._lock:
                        delta_bytes, delta_files = self._delta_bytes, self._delta_files
                    record = read_ledger_at(self._root_fd) or {}
                    holders = dict(record.get("holders", {}))
                    b = max(0, int(record.get("bytes", self._base_bytes)) + delta_bytes)
                    f = max(0, int(record.get("files", self._base_files)) + delta_files)
                    if unregister:
                        holders.pop(self.holder, None)
                    else:
                        holders[self.holder] = time.time()
                    self._store(b, f, holders)
            except OSError as exc:
                log.warning("cannot persist usage ledger: %s", exc)
                return
            with self._lock:
                self._base_bytes, self._base_files = b, f
                self._delta_bytes -= delta_bytes
                self._delta_files -= delta_files
            self._last_flush = self._last_refresh = time.monotonic()

    def _store(self, b: int, f: int, holders: dict[str, float]) -> None:
        _write_ledger_at(self._root_fd, {
            "version": LEDGER_VERSION, "bytes": b, "files": f, "clean": not holders,
            "holders": holders, "updated": time.time()})

    @contextlib.contextmanager
    def _locked(self):
        """An exclusive flock on the ledger's lock file (shared by every daemon)."""
        meta = _meta_fd(self._root_fd, create=True)
        try:
            fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=meta)
        finally:
            os.close(meta)
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                        break  # a volume without locks: last writer wins
                    if exc.errno not in (errno.EAGAIN, errno.EACCES) or \
                            time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)


def _meta_fd(root_fd: int, create: bool) -> int | None:
    flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(META_DIR, flags, dir_fd=root_fd)
    except FileNotFoundError:
        if not create:
            return None
        try:
            os.mkdir(META_DIR, 0o700, dir_fd=root_fd)
        except FileExistsError:
            pass
        return os.open(META_DIR, flags, dir_fd=root_fd)


def read_ledger_at(root_fd: int) -> dict | None:
    meta = _meta_fd(root_fd, create=False)
    if meta is None:
        return None
    try:
        fd = os.open(LEDGER_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=meta)
        with os.fdopen(fd, "rb") as f:
            record = json.loads(f.read(65536))
        if not isinstance(record, dict) or record.get("version") != LEDGER_VERSION:
            return None
        int(record["bytes"]), int(record["files"])
        if not isinstance(record.get("holders", {}), dict):
            return None
        return record
    except (OSError, ValueError, KeyError, TypeError):
        return None
    finally:
        os.close(meta)


def _write_ledger_at(root_fd: int, record: dict) -> None:
    """Atomic replace: write a temp file, fsync-free rename (the ledger is rebuildable)."""
    meta = _meta_fd(root_fd, create=True)
    try:
        tmp = f"{LEDGER_NAME}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=meta)
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(record).encode())
        os.rename(tmp, LEDGER_NAME, src_dir_fd=meta, dst_dir_fd=meta)
    finally:
        os.close(meta)


def scan_usage(root_fd: int) -> tuple[int, int]:
    """Walks the tree under ``root_fd`` (never following symlinks) → (bytes, files).

    Depth first, one descriptor per level of the tree (not per directory
    waiting to be read).  Any error other than an entry vanishing during the
    walk is raised: a usage number that cannot be known is an error, never a
    smaller number.
    """
    seen: set[tuple[int, int]] = set()
    total_bytes = 0
    files = 0
    dir_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    # each level: its descriptor and the names of its subdirectories still to walk
    stack: list[tuple[int, list[str]]] = []
    try:
        stack.append((os.open(".", dir_flags, dir_fd=root_fd), []))
        top = stack[0][0]
        fresh = True
        while stack:
            dfd, pending = stack[-1]
            if fresh:
                with os.scandir(dfd) as it:
                    for entry in it:
                        if dfd == top and entry.name == META_DIR:
                            continue
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue  # removed while the walk runs
                        key = (st.st_dev, st.st_ino)
                        if key in seen:
                            continue
                        if st.st_nlink > 1:
                            seen.add(key)
                        files += 1
                        if stat.S_ISREG(st.st_mode):
                            total_bytes += st.st_size
                        elif stat.S_ISDIR(st.st_mode):
                            pending.append(entry.name)
            if not pending:
                os.close(stack.pop()[0])
                fresh = False
                continue
            name = pending.pop()
            try:
                child = os.open(name, dir_flags, dir_fd=dfd)
            except FileNotFoundError:
                fresh = False
                continue
            stack.append((child, []))
            fresh = True
    finally:
        for dfd, _ in stack:
            os.close(dfd)
    return total_bytes, files


def read_usage(vfolder_dir: str | Path) -> tuple[int, int, bool]:
    """(bytes, files, clean) from a vfolder's ledger without walking the tree.

    Raises ``LookupError`` when the vfolder has no readable ledger (it was never
    served by azfs); callers report that as unknown, never as a number.
    """
    fd = os.open(os.fspath(vfolder_dir), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        record = read_ledger_at(fd)
    finally:
        os.close(fd)
    if record is None:
        raise LookupError(f"no usage ledger in {vfolder_dir}")
    return int(record["bytes"]), int(record["files"]), bool(record.get("clean"))


def init_ledger(vfolder_dir: str | Path) -> None:
    """Writes a clean ledger for a new (empty or scanned) vfolder directory."""
    fd = os.open(os.fspath(vfolder_dir), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        b, f = scan_usage(fd)
        _write_ledger_at(fd, {"version": LEDGER_VERSION, "bytes": b, "files": f,
                              "clean": True, "holders": {}, "updated": time.time()})
    finally:
        os.close(fd)
