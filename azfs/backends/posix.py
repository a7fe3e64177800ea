"""The posix backend: a vfolder is a directory on a mounted host volume.

Containment: every node holds an ``O_PATH | O_NOFOLLOW`` descriptor, and
every name is resolved one component at a time relative to its parent's
descriptor, so no name, ``..``, symlink or concurrent rename can make the
daemon touch anything outside the vfolder.  Symlinks are nodes like any
other: their targets are returned by ``readlink`` and never opened.
Operations on a node that have no ``*at`` form go through
``/proc/self/fd/N``, which designates exactly the inode behind the
descriptor (a symlink itself, not its target).

Every call that touches the volume goes through the volume's
:class:`~azfs.volumes.io.VolumeIO`: its worker threads with a deadline (a
hung share answers ``ETIMEDOUT``/``EIO`` and never holds the event loop or
another volume), or inline for a local filesystem.  The ``_*_sync`` methods
are what runs there; they may run concurrently, so:

* descriptors are used only while held (:func:`~azfs.backends.posix_nodes.held`);
* quota checks and the usage change they allow are one step
  (:meth:`~azfs.usage.UsageLedger.charge`), so concurrent writers never
  overshoot a quota;
* calls that change a file's size, and the removal of its last name, take the
  file's lock stripe, so a size read and the change made from it are not
  interleaved with another view's change of the same file.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import threading
from collections.abc import Sequence
from pathlib import Path

from azfs.backends.base import (
    AttrChanges,
    Attributes,
    Backend,
    DirEntry,
    DirListing,
    FileHandle,
    StatFs,
    Usage,
)
from azfs.backends.posix_nodes import (
    NodeNames,
    PosixNode,
    held,
    open_at,
    open_stat,
    pool,
    release,
)
from azfs.errors import InvalidArgument, NotSupported, QuotaExceeded
from azfs.usage import META_DIR, Quota, UsageLedger
from azfs.volumes.io import IOLimits, Kind, VolumeIO, probe_statvfs

log = logging.getLogger(__name__)

#: O_DIRECT is served through the page cache: our buffers are not aligned for it
_OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC | os.O_DIRECT | os.O_NOFOLLOW
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
#: seconds the usage ledger may take to load (a rebuild walks the whole tree) or close
LEDGER_DEADLINE = 600.0
#: bytes a sequential reader's volume is asked to read ahead (posix_fadvise WILLNEED)
READAHEAD = 8 << 20
#: xattr namespaces a vfolder user may touch; the daemon runs as root, so
#: trusted.* / security.* must never be reachable through it.
XATTR_PREFIX = "user."
_SIZE_STRIPES = 64
META = Kind.METADATA
DATA = Kind.DATA

#: the daemon's umask, read once at import (single-threaded then): the kernel already
#: applied the caller's umask to a new object's mode, so ours must not apply again
_UMASK = os.umask(0)
os.umask(_UMASK)

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


class PosixHandle(FileHandle):
    __slots__ = ("fd", "node", "append", "writable", "next_offset", "ahead", "created")

    def __init__(self, fd: int, node: PosixNode, flags: int) -> None:
        self.fd = fd
        self.node = node
        self.append = bool(flags & os.O_APPEND)
        #: only a handle that may have written has deferred write errors to report
        self.writable = flags & os.O_ACCMODE != os.O_RDONLY
        #: where a sequential reader reads next, and how far the volume was asked to read ahead
        self.next_offset = 0
        self.ahead = 0
        #: from create(): False when the name existed already (no new object)
        self.created = True


def _attrs(st: os.stat_result) -> Attributes:
    return Attributes(
        key=(st.st_dev, st.st_ino), mode=st.st_mode, size=st.st_size, nlink=st.st_nlink,
        uid=st.st_uid, gid=st.st_gid, rdev=st.st_rdev, atime_ns=st.st_atime_ns,
        mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns, blocks=st.st_blocks,
        blksize=st.st_blksize)


def check_name(name: str) -> None:
    """One path component; the kernel never sends others, but a bug must not escape."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise InvalidArgument(f"invalid name {name!r}")
    # a character is at most 4 bytes: short names need no encoding to be measured
    if len(name) > 63 and len(name.encode("utf-8", "surrogateescape")) > 255:
        raise OSError(errno.ENAMETOOLONG, "name too long")


def _close_handle(fh: PosixHandle) -> None:
    os.close(fh.fd)


class PosixBackend(Backend):
    """A directory tree with quota and incremental usage accounting."""

    def __init__(self, source: str | os.PathLike[str], quota: Quota | None = None,
                 read_only: bool = False, io: VolumeIO | None = None,
                 limits: IOLimits | None = None) -> None:
        self.source = Path(source)
        #: an inspection backend: refuses writes and never writes the usage ledger
        self.read_only = read_only
        try:
            fd = os.open(self.source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except NotADirectoryError as exc:
            raise InvalidArgument(f"source {self.source}: not a directory") from exc
        except OSError as exc:
            raise InvalidArgument(f"source {self.source}: {exc.strerror}") from exc
        st = os.fstat(fd)
        self._root = PosixNode(fd, st.st_mode, (st.st_dev, st.st_ino), None, None)
        self._names = NodeNames()
        self.ledger = UsageLedger(fd, quota, read_only=read_only)
        #: the host volume's threads and health (shared by its vfolders), or our own
        self.io = io or VolumeIO.for_fd(str(self.source), fd, limits, probe=probe_statvfs(fd))
        self._size_locks = [threading.Lock() for _ in range(_SIZE_STRIPES)]

    # ---- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        # a rebuild walks the whole tree: never on the event loop
        await self.io.run(META, self.ledger.load, blocking=True, deadline=LEDGER_DEADLINE)

    async def close(self) -> None:
        try:
            await self.io.run(DATA, self.ledger.close, blocking=True, deadline=LEDGER_DEADLINE)
        except OSError as exc:
            log.error("usage ledger of %s not persisted: %s", self.source, exc)
            return
        except Exception as exc:  # noqa: BLE001 - a degraded or hung volume
            log.error("usage ledger of %s not persisted: %s", self.source, exc)
            return
        # closed once no call still holds it (a call stuck on a hung volume may)
        release(self._root)

    async def tick(self) -> None:
        """Periodic housekeeping (persist usage); called by the filesystem's timer."""
        await self.io.run(DATA, self.ledger.flush_if_due, blocking=True)

    # ---- helpers -------------------------------------------------------------
    def _reserved(self, parent: PosixNode, name: str) -> bool:
        return parent is self._root and name == META_DIR

    def _check(self, parent: PosixNode, name: str) -> None:
        check_name(name)
        if self._reserved(parent, name):
            raise OSError(errno.EPERM, "reserved name")

    def _size_lock(self, key: tuple[int, int]) -> threading.Lock:
        return self._size_locks[hash(key) % _SIZE_STRIPES]

    def _node_at(self, parent: PosixNode, name: str) -> tuple[PosixNode, Attributes]:
        fd, st = open_stat(parent, name)
        node = PosixNode(fd, st.st_mode, (st.st_dev, st.st_ino), parent, name)
        pool.admit(node)
        self._names.add(node)
        return node, _attrs(st)

    def _release(self, node: PosixNode) -> None:
        self._names.discard(node)
        release(node)

    def _forget_node(self, result: tuple) -> None:
        """Cleanup of a late lookup/mkdir/...: the FUSE layer never saw the node."""
        self._release(result[0])

    # ---- tree ----------------------------------------------------------------
    def root(self) -> PosixNode:
        return self._root

    async def lookup(self, parent: PosixNode, name: str) -> tuple[PosixNode, Attributes]:
        check_name(name)
        if self._reserved(parent, name):
            raise OSError(errno.ENOENT, "no such file")
        return await self.io.run(META, self._node_at, parent, name, cleanup=self._forget_node)

    async def lookup_batch(self, parent: PosixNode, names: Sequence[str]
                           ) -> list[tuple[PosixNode, Attributes] | None]:
        """Nodes of many names in one call (readdirplus); ``None`` for names gone meanwhile.

        The nodes hold no descriptor yet: most listed entries are never opened,
        and the first use reopens the name (and checks it is the same object).
        """
        return await self.io.run(META, self._lookup_batch_sync, parent, names,
                                 cleanup=self._forget_batch)

    def _lookup_batch_sync(self, parent: PosixNode, names: Sequence[str]
                           ) -> list[tuple[PosixNode, Attributes] | None]:
        out: list[tuple[PosixNode, Attributes] | None] = []
        with held(parent) as parent_fd:
            for name in names:
                if self._reserved(parent, name):
                    out.append(None)
                    continue
                try:
                    st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
                except FileNotFoundError:
                    out.append(None)  # removed since the listing
                    continue
                node = PosixNode(-1, st.st_mode, (st.st_dev, st.st_ino), parent, name)
                self._names.add(node)
                out.append((node, _attrs(st)))
        return out

    def _forget_batch(self, result: list[tuple[PosixNode, Attributes] | None]) -> None:
        for item in result:
            if item is not None:
                self._release(item[0])

    async def getattr(self, node: PosixNode) -> Attributes:
        return await self.io.run(META, self._getattr_sync, node)

    @staticmethod
    def _getattr_sync(node: PosixNode) -> Attributes:
        with held(node) as fd:
            return _attrs(os.fstat(fd))

    def forget(self, node: PosixNode) -> None:
        if node is not self._root:
            self._release(node)

    def adopt(self, existing: PosixNode, new: PosixNode) -> None:
        if existing is self._root or new is self._root:
            if new is not self._root:
                self._release(new)
            return
        self._names.adopt(existing, new)

    async def opendir(self, node: PosixNode) -> DirListing:
        return await self.io.run(META, self._opendir_sync, node)

    def _opendir_sync(self, node: PosixNode) -> DirListing:
        with held(node) as node_fd:
            dfd = open_at(".", node_fd, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        entries: list[DirEntry] = []
        try:
            with os.scandir(dfd) as it:
                for e in it:
                    if node is self._root and e.name == META_DIR:
                        continue
                    try:
                        mode = _DTYPE_MODE[(e.is_dir(follow_symlinks=False),
                                            e.is_file(follow_symlinks=False),
                                            e.is_symlink())]
                        if mode == 0:
                            mode = stat.S_IFMT(e.stat(follow_symlinks=False).st_mode)
                    except FileNotFoundError:
                        continue  # removed while listed: not part of the snapshot
                    entries.append(DirEntry(e.name, mode))
        finally:
            os.close(dfd)
        return DirListing(entries)

    async def readlink(self, node: PosixNode) -> bytes:
        return await self.io.run(META, self._readlink_sync, node)

    @staticmethod
    def _readlink_sync(node: PosixNode) -> bytes:
        with held(node) as fd:
            return os.readlink(b"", dir_fd=fd)

    async def statfs(self) -> StatFs:
        st = await self.io.run(META, os.statvfs, self._root.fd)
        out = StatFs(block_size=st.f_frsize, blocks=st.f_blocks, blocks_free=st.f_bfree,
                     blocks_avail=st.f_bavail, files=st.f_files, files_free=st.f_ffree,
                     name_max=st.f_namemax)
        q = self.ledger.quota
        if q.bytes:
            used = -(-self.ledger.bytes // out.block_size)
            total = q.bytes // out.block_size
            out.blocks = total
            out.blocks_free = out.blocks_avail = min(max(0, total - used), st.f_bavail)
        if q.files:
            out.files = q.files
            out.files_free = min(max(0, q.files - self.ledger.files), st.f_ffree)
        return out

    async def usage(self) -> Usage:
        return self.usage_now()

    def usage_now(self) -> Usage:
        q = self.ledger.quota
        return Usage(bytes=self.ledger.bytes, files=self.ledger.files,
                     quota_bytes=q.bytes, quota_files=q.files)

    def set_quota(self, quota_bytes: int, quota_files: int) -> None:
        self.ledger.quota = Quota(quota_bytes, quota_files)

    # ---- files ---------------------------------------------------------------
    async def open(self, node: PosixNode, flags: int) -> PosixHandle:
        if not stat.S_ISREG(node.mode):
            # the kernel opens only regular files here; anything else is refused
            # rather than opened through /proc (a fifo would block a worker).
            raise OSError(errno.EINVAL if not stat.S_ISDIR(node.mode) else errno.EISDIR,
                          "not a regular file")
        return await self.io.run(DATA, self._open_sync, node, flags, cleanup=_close_handle)

    def _open_sync(self, node: PosixNode, flags: int) -> PosixHandle:
        with held(node) as path_fd:
            fd = open_at(_proc(path_fd), -1, (flags & ~_OPEN_STRIP) | os.O_CLOEXEC)
        try:
            if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
                self._truncate_fd(fd, node.key, 0)
        except BaseException:
            os.close(fd)
            raise
        return PosixHandle(fd, node, flags)

    async def read(self, fh: PosixHandle, offset: int, size: int) -> bytes:
        return await self.io.run(DATA, self._read_sync, fh, offset, size)

    @staticmethod
    def _read_sync(fh: PosixHandle, offset: int, size: int) -> bytes:
        if offset == fh.next_offset and offset + size + READAHEAD // 2 > fh.ahead:
            # A sequential reader: ask the volume to fetch the next window in the
            # background, so that one request in flight at a time still keeps
            # the disk (or SMB connection) busy.
            start = max(fh.ahead, offset + size)
            os.posix_fadvise(fh.fd, start, READAHEAD, os.POSIX_FADV_WILLNEED)
            fh.ahead = start + READAHEAD
        fh.next_offset = offset + size
        return os.pread(fh.fd, size, offset)

    async def write(self, fh: PosixHandle, offset: int, data: bytes) -> int:
        return await self.io.run(DATA, self._write_sync, fh, offset, data)

    def _write_sync(self, fh: PosixHandle, offset: int, data: bytes) -> int:
        with self._size_lock(fh.node.key):
            st = os.fstat(fh.fd)
            size = st.st_size
            if st.st_nlink == 0:
                # the last name is gone: its bytes left the ledger at unlink
                return os.pwrite(fh.fd, data, offset)
            start = size if fh.append else offset
            growth = start + len(data) - size
            if growth > 0:
                self.ledger.charge(bytes_delta=growth)
            try:
                written = os.pwrite(fh.fd, data, offset)
            except BaseException:
                if growth > 0:
                    self.ledger.add(bytes_delta=-growth)
                raise
            if growth > 0:
                # a short write grew the file less than charged
                actual = max(0, start + written - size)
                if actual != growth:
                    self.ledger.add(bytes_delta=actual - growth)
            return written

    async def flush(self, fh: PosixHandle) -> None:
        # close() of a duplicate reports deferred write errors (NFS, SMB)
        # without closing the handle the kernel still uses.  A local filesystem
        # reports its errors at the write itself, and a read-only handle has none
        # (one round trip to the share saved for every file a reader closes).
        if fh.writable and not self.io.inline:
            await self.io.run(DATA, _flush_fd, fh.fd)

    async def fsync(self, fh: PosixHandle, datasync: bool) -> None:
        await self.io.run(DATA, os.fdatasync if datasync else os.fsync, fh.fd)

    async def release(self, fh: PosixHandle) -> None:
        await self.io.run(DATA, os.close, fh.fd)

    async def release_attrs(self, fh: PosixHandle) -> Attributes:
        """Closes the handle and returns the file's attributes after it, in one call."""
        return await self.io.run(DATA, self._release_attrs_sync, fh)

    @staticmethod
    def _release_attrs_sync(fh: PosixHandle) -> Attributes:
        try:
            st = os.fstat(fh.fd)
        finally:
            os.close(fh.fd)
        return _attrs(st)

    def _truncate_fd(self, fd: int, key: tuple[int, int], length: int) -> None:
        with self._size_lock(key):
            st = os.fstat(fd)
            old = st.st_size
            if st.st_nlink == 0:
                os.ftruncate(fd, length)
                return
            if length > old:
                self.ledger.charge(bytes_delta=length - old)
            try:
                os.ftruncate(fd, length)
            except BaseException:
                if length > old:
                    self.ledger.add(bytes_delta=old - length)
                raise
            if length < old:
                self.ledger.add(bytes_delta=length - old)

    async def setattr(self, node: PosixNode, changes: AttrChanges,
                      fh: PosixHandle | None) -> Attributes:
        kind = DATA if changes.size is not None else META
        return await self.io.run(kind, self._setattr_sync, node, changes, fh)

    def _setattr_sync(self, node: PosixNode, changes: AttrChanges,
                      fh: PosixHandle | None) -> Attributes:
        with held(node) as node_fd:
            path = _proc(node_fd)
            is_link = stat.S_ISLNK(node.mode)
            if changes.size is not None:
                if not stat.S_ISREG(node.mode):
                    raise OSError(errno.EISDIR if stat.S_ISDIR(node.mode) else errno.EINVAL,
                                  "truncate of a non-regular file")
                if fh is not None:
                    self._truncate_fd(fh.fd, node.key, changes.size)
                else:
                    fd = open_at(path, -1, os.O_WRONLY | os.O_CLOEXEC)
                    try:
                        self._truncate_fd(fd, node.key, changes.size)
                    finally:
                        os.close(fd)
            if changes.mode is not None:
                if is_link:
                    raise OSError(errno.EOPNOTSUPP, "symlinks have no mode")
                os.chmod(path, stat.S_IMODE(changes.mode))
            if changes.uid is not None or changes.gid is not None:
                os.chown(path, -1 if changes.uid is None else changes.uid,
                         -1 if changes.gid is None else changes.gid)
            if changes.atime_ns is not None or changes.mtime_ns is not None:
                st = os.fstat(node_fd)
                atime = changes.atime_ns if changes.atime_ns is not None else st.st_atime_ns
                mtime = changes.mtime_ns if changes.mtime_ns is not None else st.st_mtime_ns
                os.utime(path, ns=(atime, mtime))
            return _attrs(os.fstat(node_fd))

    async def create(self, parent: PosixNode, name: str, mode: int,
                     flags: int) -> tuple[PosixNode, Attributes, PosixHandle]:
        self._check(parent, name)
        return await self.io.run(META, self._create_sync, parent, name, mode, flags,
                                 cleanup=self._forget_created)

    def _forget_created(self, result: tuple[PosixNode, Attributes, PosixHandle]) -> None:
        node, _, fh = result
        os.close(fh.fd)
        self._release(node)

    def _create_sync(self, parent: PosixNode, name: str, mode: int,
                     flags: int) -> tuple[PosixNode, Attributes, PosixHandle]:
        open_flags = (flags & ~_OPEN_STRIP) | os.O_CLOEXEC | os.O_NOFOLLOW
        with held(parent) as parent_fd:
            fd, created = self._create_or_open(parent_fd, name, mode, flags, open_flags)
            try:
                path_fd, st = _path_of(fd, parent_fd, name)
            except BaseException:
                os.close(fd)
                raise
        try:
            if not created and flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
                self._truncate_fd(fd, (st.st_dev, st.st_ino), 0)
                st = os.fstat(path_fd)
        except BaseException:
            os.close(fd)
            os.close(path_fd)
            raise
        node = PosixNode(path_fd, st.st_mode, (st.st_dev, st.st_ino), parent, name)
        pool.admit(node)
        self._names.add(node)
        fh = PosixHandle(fd, node, flags)
        fh.created = created
        return node, _attrs(st), fh

    def _create_or_open(self, parent_fd: int, name: str, mode: int, flags: int,
                        open_flags: int) -> tuple[int, bool]:
        """Creates the file (charged to the file quota) or opens the one that exists."""
        try:
            self.ledger.charge(files_delta=1)
        except QuotaExceeded:
            if flags & os.O_EXCL:
                raise
            try:  # no room for a new file, but an existing one may be opened
                return open_at(name, parent_fd, open_flags), False
            except FileNotFoundError:
                raise QuotaExceeded("file quota exceeded") from None
        try:
            fd = open_at(name, parent_fd, open_flags | os.O_CREAT | os.O_EXCL,
                         stat.S_IMODE(mode))
        except FileExistsError:
            self.ledger.add(files_delta=-1)
            if flags & os.O_EXCL:
                raise
            return open_at(name, parent_fd, open_flags), False
        except BaseException:
            self.ledger.add(files_delta=-1)
            raise
        if mode & _UMASK:
            try:
                os.fchmod(fd, stat.S_IMODE(mode))  # exactly the mode asked for
            except BaseException:
                os.close(fd)
                raise
        return fd, True

    def _new_object(self, parent: PosixNode, name: str, make,
                    mode: int | None = None) -> tuple[PosixNode, Attributes]:
        """Charges one file, makes the object with ``make(parent_fd)``, returns its node.

        ``mode``: the permission bits it must have, whatever the daemon's umask.
        """
        self.ledger.charge(files_delta=1)
        try:
            with held(parent) as parent_fd:
                make(parent_fd)
        except BaseException:
            self.ledger.add(files_delta=-1)
            raise
        node, attrs = self._node_at(parent, name)
        if mode is not None and mode & _UMASK:
            # (a directory keeps the set-group-id bit it inherits from its parent)
            want = stat.S_IMODE(mode) | (attrs.mode & stat.S_ISGID if attrs.is_dir else 0)
            if stat.S_IMODE(attrs.mode) != want:
                with held(node) as fd:
                    os.chmod(_proc(fd), want)
                    attrs = _attrs(os.fstat(fd))
        return node, attrs

    async def mkdir(self, parent: PosixNode, name: str, mode: int) -> tuple[PosixNode, Attributes]:
        self._check(parent, name)
        return await self.io.run(
            META, self._new_object, parent, name,
            lambda pfd: os.mkdir(name, stat.S_IMODE(mode), dir_fd=pfd), mode,
            cleanup=self._forget_node)

    async def mknod(self, parent: PosixNode, name: str, mode: int,
                    rdev: int) -> tuple[PosixNode, Attributes]:
        self._check(parent, name)
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            # device nodes would hand a container raw access to the host
            raise OSError(errno.EPERM, "device nodes are not allowed in a vfolder")
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISREG(mode)):
            raise OSError(errno.EINVAL, "unsupported file type")
        return await self.io.run(
            META, self._new_object, parent, name,
            lambda pfd: os.mknod(name, mode, 0, dir_fd=pfd), mode, cleanup=self._forget_node)

    async def symlink(self, parent: PosixNode, name: str,
                      target: bytes) -> tuple[PosixNode, Attributes]:
        self._check(parent, name)
        return await self.io.run(
            META, self._new_object, parent, name,
            lambda pfd: os.symlink(target, name, dir_fd=pfd), cleanup=self._forget_node)

    async def link(self, node: PosixNode, new_parent: PosixNode,
                   new_name: str) -> tuple[PosixNode, Attributes]:
        self._check(new_parent, new_name)
        if stat.S_ISDIR(node.mode):
            raise OSError(errno.EPERM, "hard links to directories are not allowed")
        return await self.io.run(META, self._link_sync, node, new_parent, new_name,
                                 cleanup=self._forget_node)

    def _link_sync(self, node: PosixNode, new_parent: PosixNode,
                   new_name: str) -> tuple[PosixNode, Attributes]:
        with held(node) as fd, held(new_parent) as parent_fd:
            os.link(_proc(fd), new_name, dst_dir_fd=parent_fd, follow_symlinks=True)
        return self._node_at(new_parent, new_name)

    def _forget_removed(self, st: os.stat_result) -> None:
        """Accounts for a name removed: the inode goes when its last link does."""
        if stat.S_ISDIR(st.st_mode) or st.st_nlink <= 1:
            self.ledger.add(bytes_delta=-st.st_size if stat.S_ISREG(st.st_mode) else 0,
                            files_delta=-1)

    async def unlink(self, parent: PosixNode, name: str) -> None:
        self._check(parent, name)
        await self.io.run(META, self._remove_sync, parent, name, False)

    async def rmdir(self, parent: PosixNode, name: str) -> None:
        self._check(parent, name)
        await self.io.run(META, self._remove_sync, parent, name, True)

    def _remove_sync(self, parent: PosixNode, name: str, directory: bool) -> None:
        self._names.pin(parent, name)
        with held(parent) as parent_fd:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            if directory:
                os.rmdir(name, dir_fd=parent_fd)
            elif stat.S_ISDIR(st.st_mode):
                raise OSError(errno.EISDIR, "is a directory")
            elif stat.S_ISREG(st.st_mode) and st.st_nlink <= 1:
                with self._size_lock((st.st_dev, st.st_ino)):
                    # the size given back is the one at removal: no write in between
                    st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
                    os.unlink(name, dir_fd=parent_fd)
            else:
                os.unlink(name, dir_fd=parent_fd)
            self._names.removed(parent, name)
            self._forget_removed(st)

    async def rename(self, old_parent: PosixNode, old_name: str, new_parent: PosixNode,
                     new_name: str, flags: int) -> None:
        self._check(old_parent, old_name)
        self._check(new_parent, new_name)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, "unsupported rename flags")
        if flags and _renameat2 is None:
            raise NotSupported("renameat2 is not available")
        await self.io.run(META, self._rename_sync, old_parent, old_name, new_parent,
                          new_name, flags)

    def _rename_sync(self, old_parent: PosixNode, old_name: str, new_parent: PosixNode,
                     new_name: str, flags: int) -> None:
        self._names.pin(old_parent, old_name)
        self._names.pin(new_parent, new_name)
        with held(old_parent) as old_fd, held(new_parent) as new_fd:
            replaced = None
            if not flags & RENAME_EXCHANGE:
                try:
                    replaced = os.stat(new_name, dir_fd=new_fd, follow_symlinks=False)
                except FileNotFoundError:
                    replaced = None
            if flags:
                rc = _renameat2(old_fd, old_name.encode("utf-8", "surrogateescape"),
                                new_fd, new_name.encode("utf-8", "surrogateescape"), flags)
                if rc != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            else:
                os.rename(old_name, new_name, src_dir_fd=old_fd, dst_dir_fd=new_fd)
            self._names.moved(old_parent, old_name, new_parent, new_name,
                              exchange=bool(flags & RENAME_EXCHANGE))
            if replaced is not None:
                src = os.stat(new_name, dir_fd=new_fd, follow_symlinks=False)
                if (src.st_dev, src.st_ino) != (replaced.st_dev, replaced.st_ino):
                    self._forget_removed(replaced)

    # ---- xattrs --------------------------------------------------------------
    @staticmethod
    def _xattr_allowed(name: str) -> bool:
        return name.startswith(XATTR_PREFIX)

    async def getxattr(self, node: PosixNode, name: str) -> bytes:
        if not self._xattr_allowed(name):
            # answered without a call: ls -l asks for security.* of every file
            raise OSError(errno.ENODATA, "no such attribute")
        return await self.io.run(META, _on_proc, node, os.getxattr, name)

    async def listxattr(self, node: PosixNode) -> list[str]:
        if stat.S_ISLNK(node.mode):
            return []
        names = await self.io.run(META, _on_proc, node, os.listxattr)
        return [n for n in names if self._xattr_allowed(n)]

    async def setxattr(self, node: PosixNode, name: str, value: bytes) -> None:
        if not self._xattr_allowed(name):
            raise OSError(errno.EOPNOTSUPP, "only user.* attributes are supported")
        await self.io.run(META, _on_proc, node, os.setxattr, name, value)

    async def removexattr(self, node: PosixNode, name: str) -> None:
        if not self._xattr_allowed(name):
            raise OSError(errno.EOPNOTSUPP, "only user.* attributes are supported")
        await self.io.run(META, _on_proc, node, os.removexattr, name)


def _path_of(fd: int, parent_fd: int, name: str) -> tuple[int, os.stat_result]:
    """An ``O_PATH`` descriptor of the file open as ``fd``, and its attributes.

    By its name first (a dentry lookup; an ``O_PATH`` open has no effect on
    whatever it finds), kept only if it is the very inode of ``fd``; else through
    ``/proc/self/fd``, which is exact but costs a walk of procfs.
    """
    st = os.fstat(fd)
    try:
        path_fd = open_at(name, parent_fd)
    except OSError:
        path_fd = -1
    if path_fd >= 0:
        got = os.fstat(path_fd)
        if (got.st_dev, got.st_ino) == (st.st_dev, st.st_ino):
            return path_fd, got
        os.close(path_fd)  # replaced since the create: not ours
    path_fd = open_at(_proc(fd), -1, os.O_PATH | os.O_CLOEXEC)
    try:
        return path_fd, os.fstat(path_fd)
    except BaseException:
        os.close(path_fd)
        raise


def _on_proc(node: PosixNode, fn, *args):
    """``fn(/proc/self/fd/N, *args)`` for a call that has no descriptor form."""
    with held(node) as fd:
        return fn(_proc(fd), *args)


def _flush_fd(fd: int) -> None:
    os.close(os.dup(fd))


# (is_dir, is_file, is_symlink) → type bits; 0 = ask stat (fifo, socket, device)
_DTYPE_MODE = {
    (True, False, False): stat.S_IFDIR,
    (False, True, False): stat.S_IFREG,
    (False, False, True): stat.S_IFLNK,
    (False, False, False): 0,
}
