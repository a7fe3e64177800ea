"""A stand-in for a network share: a passthrough FUSE filesystem that delays every request.

Run as its own process (tests and benches do it through :func:`slow_volume`)::

    python -m tests.support.slowfs SOURCE MOUNTPOINT --latency-ms 2 [--control FILE]

It serves the directory SOURCE at MOUNTPOINT and sleeps the latency before
answering each request, as every call to an SMB share costs a round trip.
Requests overlap while they sleep (pyfuse3's worker tasks), so concurrent
callers see the latency, not a queue; the system calls themselves run inline
on the event loop, against local disk.  ``forget`` is the one request served
without delay (it has no reply, so it has no round trip).

* Mounted with ``allow_other`` and without ``default_permissions``: the daemon
  runs as root and performs every call itself, as the share's server would for
  the one identity a node mounts it with.  Created objects get the caller's
  uid/gid; ``access`` always allows.
* Extended attributes: the ``user.`` namespace only (EOPNOTSUPP for others).
* pyfuse3 does not negotiate parallel directory operations (FUSE_PARALLEL_DIROPS
  is absent from its INIT reply), so the kernel sends one lookup or readdir at a
  time per directory; requests on different directories and on open files
  overlap.  A kernel cifs client has no such limit.
* Latency at run time: write ``{"token": T, "latency_ms": X}`` to the
  ``--control`` file and send SIGUSR1; the daemon applies it and writes
  ``<control>.status`` (JSON with the same token, the latency, request counts,
  the peak of requests in flight and the number of inodes it holds).
  ``latency_ms`` may be left out to only ask for the status.
* Frozen and thawed with ``kill -STOP`` / ``kill -CONT`` of the process: what
  a hung SMB server looks like to the kernel.  A frozen daemon blocks every
  caller of the mount, ``umount`` too: thaw before unmounting.  Closing a file
  of the mount blocks as well (FLUSH), and so does starting a subprocess from a
  process holding one open (the child closes it): while frozen, keep files open
  only in processes that start nothing.

Inode invariants: each inode the kernel knows holds one ``O_PATH`` descriptor
of its source object, so renames, hard links and unlinked-but-open files stay
right without path bookkeeping; its lookup count is exactly what the kernel
was told (lookup, create, mkdir, mknod, symlink, link, each accepted
readdirplus entry), and ``forget`` closes the descriptor when the count
reaches zero.  Inode numbers are the source's ``st_ino`` (the source root is
inode 1), so an object keeps its number across forget and lookup.  SOURCE
must be one filesystem (no mounts below it).

The rest of this module is the test-side handle: :class:`SlowVolume`,
:func:`slow_volume` and the ``slowfs`` pytest fixture factory, whose cleanup
always thaws, unmounts (``fusermount3 -u -z``) and ends the daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import functools
import json
import logging
import math
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio
from pyfuse3 import FUSEError

from azfs.volumes.hostmount import MountError, lazy_unmount
from azfs.volumes.mountinfo import find_mount, is_mounted, read_mountinfo

REPO = Path(__file__).resolve().parents[2]
log = logging.getLogger("slowfs")

AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
UTIME_OMIT = (1 << 30) - 2
XATTR_NAMESPACE = b"user."
_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(ret: int) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _fchown(fd: int, uid: int, gid: int) -> None:
    """``fchownat(fd, "", AT_EMPTY_PATH|AT_SYMLINK_NOFOLLOW)``: works on O_PATH fds and symlinks."""
    _check(_libc.fchownat(fd, b"", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))


def _futimens(fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    """Sets the times of an O_PATH fd's object (None leaves that time alone)."""
    def spec(ns: int | None) -> _Timespec:
        return _Timespec(0, UTIME_OMIT) if ns is None else _Timespec(*divmod(ns, 10**9))
    times = (_Timespec * 2)(spec(atime_ns), spec(mtime_ns))
    _check(_libc.utimensat(fd, b"", times, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))


def _link(fd: int, new_dir_fd: int, new_name: bytes) -> None:
    _check(_libc.linkat(fd, b"", new_dir_fd, new_name, AT_EMPTY_PATH))


def _rename(old_dir_fd: int, old: bytes, new_dir_fd: int, new: bytes, flags: int) -> None:
    _check(_libc.renameat2(old_dir_fd, old, new_dir_fd, new, flags))


def _proc(fd: int) -> str:
    """The path that reaches an O_PATH fd's object (for calls without an fd form)."""
    return f"/proc/self/fd/{fd}"


# ---- the filesystem ------------------------------------------------------------------
@dataclass
class _Node:
    fd: int  #: O_PATH | O_NOFOLLOW descriptor of the source object
    nlookup: int


@dataclass
class _DirHandle:
    fd: int  #: an O_RDONLY descriptor of the directory
    #: names snapshotted when a listing starts at offset 0; offsets index it
    names: list[bytes] = field(default_factory=list)


def request(fn: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """One FUSE request: counted, delayed by the latency, then served atomically.

    The body is synchronous, so nothing else runs between its system calls and
    the reply (which keeps lookup counts exact); errors become FUSEError, the
    only exception a handler may raise.
    """
    name = fn.__name__

    @functools.wraps(fn)
    async def handler(self: SlowFS, *args: Any) -> Any:
        self.requests[name] += 1
        self.in_flight += 1
        self.in_flight_max = max(self.in_flight_max, self.in_flight)
        try:
            if self.latency > 0:
                await trio.sleep(self.latency)
            return fn(self, *args)
        except FUSEError:
            raise
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", name)
            raise FUSEError(errno.EIO) from None
        finally:
            self.in_flight -= 1
    return handler


class SlowFS(pyfuse3.Operations):
    """Passthrough of one source directory; every request costs ``latency`` seconds."""

    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, source: str, latency: float, cache_timeout: float) -> None:
        super().__init__()
        self.latency = latency
        self.cache_timeout = cache_timeout
        self.requests: Counter[str] = Counter()
        self.in_flight = 0
        self.in_flight_max = 0
        root_fd = os.open(source, os.O_PATH | os.O_DIRECTORY)
        st = os.fstat(root_fd)
        self._root_ino, self._dev = st.st_ino, st.st_dev
        self._nodes: dict[int, _Node] = {pyfuse3.ROOT_INODE: _Node(root_fd, 1)}
        self._files: set[int] = set()
        self._dirs: dict[int, _DirHandle] = {}

    # ---- inode table --------------------------------------------------------------
    def _fd(self, inode: int) -> int:
        node = self._nodes.get(inode)
        if node is None:
            log.error("request for unknown inode %d", inode)
            raise FUSEError(errno.EIO)
        return node.fd

    def _inode_of(self, st: os.stat_result) -> int:
        if st.st_dev != self._dev:
            log.error("object on another filesystem below the source (dev %d)", st.st_dev)
            raise FUSEError(errno.EIO)
        if st.st_ino == self._root_ino:
            return pyfuse3.ROOT_INODE
        if st.st_ino == pyfuse3.ROOT_INODE:
            log.error("source object with st_ino 1 collides with the root inode")
            raise FUSEError(errno.EIO)
        return st.st_ino

    def _remember(self, fd: int) -> pyfuse3.EntryAttributes:
        """Counts one lookup of the object behind ``fd`` (an O_PATH fd it takes over)."""
        try:
            st = os.fstat(fd)
            inode = self._inode_of(st)
        except BaseException:
            os.close(fd)
            raise
        self._adopt(inode, fd)
        return self._attr(inode, st)

    def _adopt(self, inode: int, fd: int) -> None:
        node = self._nodes.get(inode)
        if node is None:
            self._nodes[inode] = _Node(fd, 1)
        else:
            os.close(fd)
            node.nlookup += 1

    def _attr(self, inode: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.generation = 0
        attr.entry_timeout = self.cache_timeout
        attr.attr_timeout = self.cache_timeout
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                     "st_blksize", "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(attr, name, getattr(st, name))
        return attr

    def _stat(self, inode: int) -> pyfuse3.EntryAttributes:
        return self._attr(inode, os.fstat(self._fd(inode)))

    def _open_child(self, parent: int, name: bytes) -> int:
        if parent == pyfuse3.ROOT_INODE and name == b"..":
            name = b"."  # never above the source
        return os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=self._fd(parent))

    def _created(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext
                 ) -> pyfuse3.EntryAttributes:
        """Gives a new object the caller's ownership and counts its lookup."""
        fd = self._open_child(parent, name)
        try:
            _fchown(fd, ctx.uid, ctx.gid)
        except BaseException:
            os.close(fd)
            raise
        return self._remember(fd)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        self.requests["forget"] += 1
        for inode, nlookup in inode_list:
            if inode == pyfuse3.ROOT_INODE:
                continue
            node = self._nodes.get(inode)
            if node is None or node.nlookup < nlookup:
                log.error("forget(%d, %d) beyond its lookup count %s", inode, nlookup,
                          None if node is None else node.nlookup)
                if node is None:
                    continue
                nlookup = node.nlookup
            node.nlookup -= nlookup
            if node.nlookup == 0:
                del self._nodes[inode]
                os.close(node.fd)

    def node_count(self) -> int:
        return len(self._nodes)

    def close_all(self) -> None:
        for fd in [*self._files, *self._dirs]:
            with contextlib.suppress(OSError):
                os.close(fd)
        for node in self._nodes.values():
            with contextlib.suppress(OSError):
                os.close(node.fd)
        self._files.clear()
        self._dirs.clear()
        self._nodes.clear()

    # ---- names ----------------------------------------------------------------------------
    @request
    def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
               ) -> pyfuse3.EntryAttributes:
        return self._remember(self._open_child(parent_inode, name))

    @request
    def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._stat(inode)

    @request
    def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        fd = self._fd(inode)
        is_link = stat.S_ISLNK(os.fstat(fd).st_mode)
        if fields.update_size:
            if fh is not None:
                os.ftruncate(fh, attr.st_size)
            elif is_link:
                raise FUSEError(errno.EINVAL)
            else:
                os.truncate(_proc(fd), attr.st_size)
        if fields.update_mode:
            if is_link:
                raise FUSEError(errno.EOPNOTSUPP)
            os.chmod(_proc(fd), stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            _fchown(fd, attr.st_uid if fields.update_uid else -1,
                    attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            _futimens(fd, attr.st_atime_ns if fields.update_atime else None,
                      attr.st_mtime_ns if fields.update_mtime else None)
        return self._stat(inode)

    @request
    def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.readlink(b"", dir_fd=self._fd(inode))

    @request
    def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
              ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        os.mknod(name, mode & ~ctx.umask, rdev, dir_fd=self._fd(parent_inode))
        return self._created(parent_inode, name, ctx)

    @request
    def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
              ) -> pyfuse3.EntryAttributes:
        os.mkdir(name, mode & ~ctx.umask & 0o7777, dir_fd=self._fd(parent_inode))
        return self._created(parent_inode, name, ctx)

    @request
    def symlink(self, parent_inode: int, name: bytes, target: bytes,
                ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        os.symlink(target, name, dir_fd=self._fd(parent_inode))
        return self._created(parent_inode, name, ctx)

    @request
    def link(self, inode: int, new_parent_inode: int, new_name: bytes,
             ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        _link(self._fd(inode), self._fd(new_parent_inode), new_name)
        self._nodes[inode].nlookup += 1
        return self._stat(inode)

    @request
    def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.unlink(name, dir_fd=self._fd(parent_inode))

    @request
    def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.rmdir(name, dir_fd=self._fd(parent_inode))

    @request
    def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
               name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        _rename(self._fd(parent_inode_old), name_old, self._fd(parent_inode_new), name_new,
                flags)

    # ---- files ------------------------------------------------------------------------------
    @request
    def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        # the kernel resolved the name already; O_NOFOLLOW would refuse the /proc link
        fd = os.open(_proc(self._fd(inode)),
                     flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW))
        self._files.add(fd)
        return pyfuse3.FileInfo(fh=fd)

    @request
    def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
               ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        dir_fd = self._fd(parent_inode)
        flags = (flags | os.O_NOFOLLOW) & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY)
        try:
            fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, mode & ~ctx.umask & 0o7777,
                         dir_fd=dir_fd)
        except FileExistsError:
            fd = os.open(name, flags, dir_fd=dir_fd)  # raced with another creator: open it
        else:
            os.fchown(fd, ctx.uid, ctx.gid)
        try:
            attr = self._remember(os.open(_proc(fd), os.O_PATH))
        except BaseException:
            os.close(fd)
            raise
        self._files.add(fd)
        return pyfuse3.FileInfo(fh=fd), attr

    @request
    def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    @request
    def write(self, fh: int, off: int, buf: bytes) -> int:
        return os.pwrite(fh, buf, off)

    @request
    def flush(self, fh: int) -> None:
        pass

    @request
    def fsync(self, fh: int, datasync: bool) -> None:
        (os.fdatasync if datasync else os.fsync)(fh)

    @request
    def release(self, fh: int) -> None:
        self._files.discard(fh)
        os.close(fh)

    # ---- directories --------------------------------------------------------------------
    @request
    def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=self._fd(inode))
        self._dirs[fd] = _DirHandle(fd)
        return fd

    @request
    def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._dirs[fh]
        if start_id == 0:
            handle.names = [os.fsencode(n) for n in os.listdir(fh)]
        for index in range(start_id, len(handle.names)):
            name = handle.names[index]
            try:
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=fh)
            except FileNotFoundError:
                continue  # removed since the listing started
            try:
                st = os.fstat(fd)
                inode = self._inode_of(st)
                accepted = pyfuse3.readdir_reply(token, name, self._attr(inode, st), index + 1)
            except BaseException:
                os.close(fd)
                raise
            if not accepted:
                os.close(fd)
                return
            self._adopt(inode, fd)

    @request
    def fsyncdir(self, fh: int, datasync: bool) -> None:
        os.fsync(fh)

    @request
    def releasedir(self, fh: int) -> None:
        del self._dirs[fh]
        os.close(fh)

    # ---- the rest ------------------------------------------------------------------------
    @request
    def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(_proc(self._fd(pyfuse3.ROOT_INODE)))
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(out, name, getattr(st, name))
        return out

    @request
    def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        self._fd(inode)
        return True

    def _xattr_path(self, inode: int, name: bytes | None) -> str | None:
        """The path for an xattr call, or None for a symlink (which has no user xattrs)."""
        if name is not None and not name.startswith(XATTR_NAMESPACE):
            raise FUSEError(errno.EOPNOTSUPP)
        fd = self._fd(inode)
        return None if stat.S_ISLNK(os.fstat(fd).st_mode) else _proc(fd)

    @request
    def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        path = self._xattr_path(inode, name)
        if path is None:
            raise FUSEError(errno.ENODATA)
        return os.getxattr(path, name)

    @request
    def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        path = self._xattr_path(inode, None)
        if path is None:
            return []
        names = (os.fsencode(n) for n in os.listxattr(path))
        return [n for n in names if n.startswith(XATTR_NAMESPACE)]

    @request
    def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
                 ) -> None:
        path = self._xattr_path(inode, name)
        if path is None:
            raise FUSEError(errno.EPERM)
        os.setxattr(path, name, value)

    @request
    def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._xattr_path(inode, name)
        if path is None:
            raise FUSEError(errno.ENODATA)
        os.removexattr(path, name)


# ---- the daemon ---------------------------------------------------------------------------
def _latency_seconds(value: Any) -> float:
    ms = float(value)
    if not math.isfinite(ms) or ms < 0:
        raise ValueError(f"latency must be a finite number of ms >= 0, not {value!r}")
    return ms / 1000


def _apply_control(fs: SlowFS, control: Path) -> None:
    """Reads the control file, applies it and answers in ``<control>.status``."""
    token = None
    try:
        order = json.loads(control.read_text())
        if not isinstance(order, dict):
            raise ValueError("the control file must hold a JSON object")
        token = order.get("token")
        if order.get("latency_ms") is not None:
            fs.latency = _latency_seconds(order["latency_ms"])
            log.info("latency now %.3f ms", fs.latency * 1000)
        status: dict[str, Any] = {"token": token, "latency_ms": fs.latency * 1000,
                                  "requests": dict(fs.requests),
                                  "in_flight_max": fs.in_flight_max,
                                  "nodes": fs.node_count(), "pid": os.getpid()}
        if order.get("reset"):
            fs.in_flight_max = fs.in_flight
    except (OSError, ValueError, TypeError) as exc:
        status = {"token": token, "error": str(exc)}
    tmp = control.with_name(control.name + ".status.tmp")
    tmp.write_text(json.dumps(status))
    tmp.replace(control.with_name(control.name + ".status"))


async def _serve(fs: SlowFS, control: Path | None, max_tasks: int) -> bool:
    """Runs the FUSE loop; True when it ended on a signal (still mounted)."""
    stopped = False

    async def signals() -> None:
        nonlocal stopped
        with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGTERM, signal.SIGINT) as rx:
            async for signum in rx:
                if signum == signal.SIGUSR1:
                    if control is not None:
                        _apply_control(fs, control)
                else:
                    stopped = True
                    pyfuse3.terminate()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(signals)
        await pyfuse3.main(min_tasks=1, max_tasks=max_tasks)
        nursery.cancel_scope.cancel()
    return stopped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.support.slowfs",
                                description="Passthrough FUSE filesystem with a latency "
                                            "per request (a network share stand-in).")
    p.add_argument("source", type=Path)
    p.add_argument("mountpoint", type=Path)
    p.add_argument("--latency-ms", type=float, default=0.0, help="delay of every request")
    p.add_argument("--control", type=Path, default=None,
                   help="JSON control file, re-read on SIGUSR1")
    p.add_argument("--cache-timeout", type=float, default=1.0,
                   help="kernel entry/attribute cache timeout in s (cifs actimeo=1)")
    p.add_argument("--max-tasks", type=int, default=256, help="requests served at once")
    p.add_argument("--default-permissions", action="store_true",
                   help="let the kernel check permissions from the mode bits")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    try:
        latency = _latency_seconds(args.latency_ms)
    except ValueError as exc:
        p.error(str(exc))
    if not args.source.is_dir():
        p.error(f"source {args.source} is not a directory")
    if not args.mountpoint.is_dir():
        p.error(f"mountpoint {args.mountpoint} is not a directory")
    if args.cache_timeout < 0 or args.max_tasks < 1:
        p.error("--cache-timeout must be >= 0 and --max-tasks >= 1")
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s slowfs[%(process)d] %(levelname)s %(message)s")
    os.umask(0)  # the caller's umask comes with each request
    # until the event loop listens, a control signal must not end the process
    signal.signal(signal.SIGUSR1, lambda *_: None)
    fs = SlowFS(str(args.source), latency, args.cache_timeout)
    options = set(pyfuse3.default_options) - {"default_permissions"}
    options |= {"fsname=slowfs", "subtype=slowfs", "allow_other"}
    if args.default_permissions:
        options.add("default_permissions")
    try:
        pyfuse3.init(fs, str(args.mountpoint), options)
    except RuntimeError as exc:
        print(f"slowfs: cannot mount {args.mountpoint}: {exc}", file=sys.stderr)
        return 1
    stopped = True
    try:
        stopped = trio.run(_serve, fs, args.control, args.max_tasks)
    finally:
        # after a lazy unmount the path may hold someone else's mount: leave that alone
        entry = find_mount(args.mountpoint)
        pyfuse3.close(unmount=stopped and entry is not None and entry.fstype == "fuse.slowfs")
        fs.close_all()
    return 0


# ---- the test-side handle ------------------------------------------------------------------
def process_state(pid: int) -> str:
    """The process state letter from /proc (``T`` stopped, ``Z`` zombie), or ``""``."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


@dataclass
class SlowVolume:
    """One running slowfs daemon: a share stand-in at ``mountpoint`` serving ``source``."""

    source: Path
    mountpoint: Path
    control: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    frozen: bool = False
    #: "major:minor" of the mounted filesystem: finds its bind mounts at cleanup
    device: str = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None, "slowfs is not running"
        return self.proc.pid

    def start(self, latency_ms: float, *options: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        argv = [sys.executable, "-m", "tests.support.slowfs", str(self.source),
                str(self.mountpoint), "--latency-ms", str(latency_ms),
                "--control", str(self.control), *options]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + 30
        while not is_mounted(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.cleanup()
                raise RuntimeError(f"slowfs did not mount {self.mountpoint}:\n{self.log_text()}")
            time.sleep(0.02)
        entry = find_mount(self.mountpoint)
        self.device = entry.device if entry is not None else ""
        try:
            self.status()  # ready means answering control orders too
        except BaseException:
            self.cleanup()
            raise

    def freeze(self) -> None:
        """SIGSTOP: every call into the mount now blocks, as on a hung SMB server."""
        os.kill(self.pid, signal.SIGSTOP)
        self.frozen = True
        _wait(lambda: process_state(self.pid) == "T", 10, "slowfs to stop")

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        _wait(lambda: process_state(self.pid) not in ("T", "t"), 10, "slowfs to continue")
        self.frozen = False

    def set_latency(self, ms: float) -> None:
        """Changes the latency of every later request (returns once applied)."""
        self._order({"latency_ms": ms})

    def status(self, reset_peak: bool = False) -> dict[str, Any]:
        """Request counts (by operation), ``in_flight_max``, ``nodes`` and the latency."""
        return self._order({"reset": reset_peak})

    def requests(self) -> int:
        """Requests served so far (``forget`` included)."""
        return sum(self.status()["requests"].values())

    def _order(self, order: dict[str, Any]) -> dict[str, Any]:
        if self.frozen:
            raise RuntimeError("slowfs is frozen: thaw it first")
        token = uuid.uuid4().hex
        tmp = self.control.with_name(self.control.name + ".tmp")
        tmp.write_text(json.dumps({**order, "token": token}))
        tmp.replace(self.control)
        status_file = self.control.with_name(self.control.name + ".status")
        answer: dict[str, Any] = {}
        deadline = time.monotonic() + 15
        while answer.get("token") != token:
            # (re)sent: a signal that arrives before the daemon listens is lost
            os.kill(self.pid, signal.SIGUSR1)
            resend = time.monotonic() + 0.5
            while answer.get("token") != token and time.monotonic() < resend:
                time.sleep(0.01)
                with contextlib.suppress(OSError, ValueError):
                    answer = json.loads(status_file.read_text())
            if time.monotonic() > deadline:
                raise TimeoutError("slowfs did not answer its control file")
        if "error" in answer:
            raise ValueError(answer["error"])
        return answer

    def cleanup(self) -> None:
        """Thaws, unmounts lazily and ends the daemon, whatever state it is in.

        Bind mounts of this filesystem made elsewhere (an agent's volume mount
        of it) go too: the daemon could not end while they exist.
        """
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
        self.frozen = False
        for _ in range(5):
            if not is_mounted(self.mountpoint):
                break
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)],
                           capture_output=True, timeout=30, check=False)
        copies = [e.mount_point for e in read_mountinfo()
                  if self.device and e.device == self.device and e.fstype == "fuse.slowfs"]
        for path in sorted(copies, key=len, reverse=True):
            with contextlib.suppress(OSError, MountError):
                lazy_unmount(path)
        if proc is not None:
            # unmounted: the daemon ends by itself once the last user of the mount is gone
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> SlowVolume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def slow_volume(root: Path, latency_ms: float = 0.0, *, source: Path | None = None,
                mountpoint: Path | None = None, cache_timeout: float = 1.0,
                options: tuple[str, ...] = ()) -> SlowVolume:
    """Starts slowfs over ``source`` (default a new dir under ``root``) at ``mountpoint``.

    The caller owns the result: call ``cleanup()`` (or use it as a context
    manager); the ``slowfs`` fixture does it for you.
    """
    n = 0
    while (root / f"slow{n}.log").exists():
        n += 1
    src = source if source is not None else root / f"slow{n}-src"
    mnt = mountpoint if mountpoint is not None else root / f"slow{n}-mnt"
    src.mkdir(parents=True, exist_ok=True)
    mnt.mkdir(parents=True, exist_ok=True)
    volume = SlowVolume(src, mnt, root / f"slow{n}.control", root / f"slow{n}.log")
    volume.log.touch()
    volume.start(latency_ms, "--cache-timeout", str(cache_timeout), *options)
    return volume


@pytest.fixture
def slowfs(tmp_path: Path) -> Iterator[Callable[..., SlowVolume]]:
    """Factory: ``slowfs(latency_ms=2)`` → a live :class:`SlowVolume` (see :func:`slow_volume`).

    Every volume made is thawed, unmounted and ended at teardown, even when
    the test failed or froze it.
    """
    volumes: list[SlowVolume] = []

    def factory(latency_ms: float = 0.0, **kwargs: Any) -> SlowVolume:
        volume = slow_volume(tmp_path, latency_ms, **kwargs)
        volumes.append(volume)
        return volume

    try:
        yield factory
    finally:
        for volume in reversed(volumes):
            volume.cleanup()


if __name__ == "__main__":
    sys.exit(main())
