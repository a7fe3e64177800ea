"""Incremental usage accounting (bytes, file count) and quota checks of a vfolder.

The ledger lives inside the vfolder's backing directory, under the reserved
name :data:`META_DIR` (hidden from and untouchable through the filesystem),
so it travels with the data and the manager can read it on its own mount of
the volume.  Invariants:

* ``bytes`` is the sum of apparent sizes of regular files, each inode counted
  once whatever its number of hard links; ``files`` counts inodes of every
  type (files, directories, symlinks, fifos) except the vfolder root.
* While a filesystem serves the vfolder the ledger on disk says
  ``clean: false`` and is rewritten at most every :data:`FLUSH_INTERVAL`
  seconds when it changed; a clean unmount writes ``clean: true``.  A ledger
  found unclean (a crash) or missing is rebuilt with one walk of the tree.
* Quota checks reserve the growth *before* the data is written, so a refused
  write has written nothing.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from azfs.errors import QuotaExceeded

log = logging.getLogger(__name__)

META_DIR = ".azfs-meta"
LEDGER_NAME = "usage.json"
FLUSH_INTERVAL = 1.0
LEDGER_VERSION = 1


@dataclass(slots=True)
class Quota:
    """Limits of a vfolder; 0 means unlimited."""

    bytes: int = 0
    files: int = 0

    def __post_init__(self) -> None:
        if self.bytes < 0 or self.files < 0:
            raise ValueError("quotas must be >= 0 (0 means unlimited)")


class UsageLedger:
    """Counters of one vfolder with quota enforcement and crash-safe persistence."""

    def __init__(self, root_fd: int, quota: Quota | None = None) -> None:
        self._root_fd = root_fd
        self.quota = quota or Quota()
        self.bytes = 0
        self.files = 0
        self._dirty = False
        self._last_flush = 0.0

    # ---- loading -----------------------------------------------------------
    def load(self) -> bool:
        """Loads the ledger, rescanning when it is missing or unclean.

        Returns True when a rescan was needed.  Marks the ledger unclean on
        disk, since from now on it may run ahead of what is persisted.
        """
        record = read_ledger_at(self._root_fd)
        rescanned = record is None or not record.get("clean", False)
        if rescanned:
            self.bytes, self.files = scan_usage(self._root_fd)
            log.info("usage rebuilt by a scan: %d bytes, %d files", self.bytes, self.files)
        else:
            self.bytes, self.files = int(record["bytes"]), int(record["files"])
        self._write(clean=False)
        return rescanned

    # ---- quota and accounting ----------------------------------------------
    def check_bytes(self, growth: int) -> None:
        if growth > 0 and self.quota.bytes and self.bytes + growth > self.quota.bytes:
            raise QuotaExceeded(
                f"byte quota {self.quota.bytes} would be exceeded ({self.bytes} used)")

    def check_files(self, count: int = 1) -> None:
        if self.quota.files and self.files + count > self.quota.files:
            raise QuotaExceeded(
                f"file quota {self.quota.files} would be exceeded ({self.files} used)")

    def add(self, bytes_delta: int = 0, files_delta: int = 0) -> None:
        if bytes_delta or files_delta:
            self.bytes = max(0, self.bytes + bytes_delta)
            self.files = max(0, self.files + files_delta)
            self._dirty = True

    # ---- persistence -------------------------------------------------------
    def flush_if_due(self) -> None:
        now = time.monotonic()
        if self._dirty and now - self._last_flush >= FLUSH_INTERVAL:
            self._write(clean=False)

    def close(self) -> None:
        """Persists the counters as clean (only after the last write is done)."""
        self._write(clean=True)

    def _write(self, clean: bool) -> None:
        record = {"version": LEDGER_VERSION, "bytes": self.bytes, "files": self.files,
                  "clean": clean, "updated": time.time()}
        try:
            _write_ledger_at(self._root_fd, record)
        except OSError as exc:
            log.warning("cannot persist usage ledger: %s", exc)
            return
        self._dirty = False
        self._last_flush = time.monotonic()


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
    """Walks the tree under ``root_fd`` (never following symlinks) → (bytes, files)."""
    seen: set[tuple[int, int]] = set()
    total_bytes = 0
    files = 0
    stack = [os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)]
    top = stack[0]
    while stack:
        dfd = stack.pop()
        try:
            with os.scandir(dfd) as it:
                for entry in it:
                    if dfd == top and entry.name == META_DIR:
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue
                    if st.st_nlink > 1:
                        seen.add(key)
                    files += 1
                    if stat.S_ISREG(st.st_mode):
                        total_bytes += st.st_size
                    elif stat.S_ISDIR(st.st_mode):
                        try:
                            stack.append(os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY
                                                 | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd))
                        except OSError:
                            pass
        finally:
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
                              "clean": True, "updated": time.time()})
    finally:
        os.close(fd)
