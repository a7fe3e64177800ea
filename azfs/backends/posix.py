"""The posix backend: a vfolder is a directory on a mounted host volume.

Containment: every node holds an ``O_PATH | O_NOFOLLOW`` descriptor, and
every name is resolved one component at a time relative to its parent's
descriptor, so no name, ``..``, symlink or concurrent rename can make the
daemon touch anything outside the vfolder.  Symlinks are nodes like any
other: their targets are returned by ``readlink`` and never opened.
Operations on a node that have no ``*at`` form go through
``/proc/self/fd/N``, which designates exactly the inode behind the
descriptor (a symlink itself, not its target).

System calls run inline on the event loop: for a local or page-cached volume
a thread hop costs more than the call.  ``statfs`` (the call that blocks on a
dead SMB server) runs in a thread with a timeout.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import time
from pathlib import Path

import trio

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
from azfs.backends.posix_nodes import NodeNames, PosixNode, node_fd, open_at, pool, release
from azfs.errors import BackendUnavailable, InvalidArgument, NotSupported
from azfs.usage import META_DIR, Quota, UsageLedger

log = logging.getLogger(__name__)

#: O_DIRECT is served through the page cache: our buffers are not aligned for it
_OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC | os.O_DIRECT | os.O_NOFOLLOW
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
STATFS_TIMEOUT = 10.0
#: bytes a sequential reader's volume is asked to read ahead (posix_fadvise WILLNEED)
READAHEAD = 8 << 20
#: xattr namespaces a vfolder user may touch; the daemon runs as root, so
#: trusted.* / security.* must never be reachable through it.
XATTR_PREFIX = "user."

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
_statfs_limiter = trio.CapacityLimiter(4)


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


class PosixHandle(FileHandle):
    __slots__ = ("fd", "node", "append", "next_offset", "ahead", "created")

    def __init__(self, fd: int, node: PosixNode, append: bool) -> None:
        self.fd = fd
        self.node = node
        self.append = append
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
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        raise OSError(errno.ENAMETOOLONG, "name too long")


class PosixBackend(Backend):
    """A directory tree with quota and incremental usage accounting."""

    def __init__(self, source: str | os.PathLike[str], quota: Quota | None = None,
                 read_only: bool = False) -> None:
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

    # ---- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        # a rebuild walks the whole tree: not on the event loop
        await trio.to_thread.run_sync(self.ledger.load)

    async def close(self) -> None:
        with trio.move_on_after(STATFS_TIMEOUT) as scope:
            await trio.to_thread.run_sync(self.ledger.close, abandon_on_cancel=True)
        if scope.cancelled_caught:
            log.error("usage ledger of %s not persisted: the volume does not answer",
                      self.source)
        else:
            os.close(self._root.fd)

    def tick(self) -> None:
        """Periodic housekeeping (persist usage); called by the filesystem's timer."""
        self.ledger.flush_if_due()

    # ---- helpers -------------------------------------------------------------
    def _reserved(self, parent: PosixNode, name: str) -> bool:
        return parent is self._root and name == META_DIR

    def _check(self, parent: PosixNode, name: str) -> None:
        check_name(name)
        if self._reserved(parent, name):
            raise OSError(errno.EPERM, "reserved name")

    def _node_at(self, parent: PosixNode, name: str) -> tuple[PosixNode, Attributes]:
        fd = open_at(name, node_fd(parent))
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        node = PosixNode(fd, st.st_mode, (st.st_dev, st.st_ino), parent, name)
        pool.admit(node)
        self._names.add(node)
        return node, _attrs(st)

    # ---- tree ----------------------------------------------------------------
    def root(self) -> PosixNode:
        return self._root

    async def lookup(self, parent: PosixNode, name: str) -> tuple[PosixNode, Attributes]:
        pool.begin()
        check_name(name)
        if self._reserved(parent, name):
            raise OSError(errno.ENOENT, "no such file")
        return self._node_at(parent, name)

    async def getattr(self, node: PosixNode) -> Attributes:
        pool.begin()
        return _attrs(os.fstat(node_fd(node)))

    def forget(self, node: PosixNode) -> None:
        if node is not self._root:
            release(node)

    def adopt(self, existing: PosixNode, new: PosixNode) -> None:
        if existing is self._root or new is self._root:
            if new is not self._root:
                release(new)
            return
        self._names.adopt(existing, new)

    async def opendir(self, node: PosixNode) -> DirListing:
        pool.begin()
        dfd = open_at(".", node_fd(node), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
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
                    except OSError:
                        continue
                    if mode == 0:
                        mode = stat.S_IFMT(e.stat(follow_symlinks=False).st_mode)
                    entries.append(DirEntry(e.name, mode, e.inode()))
        finally:
            os.close(dfd)
        return DirListing(entries)

    async def readlink(self, node: PosixNode) -> bytes:
        pool.begin()
        return os.readlink(b"", dir_fd=node_fd(node))

    async def statfs(self) -> StatFs:
        def call() -> os.statvfs_result:
            return os.statvfs(self._root.fd)

        with trio.move_on_after(STATFS_TIMEOUT) as scope:
            st = await trio.to_thread.run_sync(call, abandon_on_cancel=True,
                                               limiter=_statfs_limiter)
        if scope.cancelled_caught:
            raise BackendUnavailable(f"statfs of {self.source} timed out")
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
        q = self.ledger.quota
        return Usage(bytes=self.ledger.bytes, files=self.ledger.files,
                     quota_bytes=q.bytes, quota_files=q.files)

    # ---- files ---------------------------------------------------------------
    async def open(self, node: PosixNode, flags: int) -> PosixHandle:
        pool.begin()
        if not stat.S_ISREG(node.mode):
            # the kernel opens only regular files here; anything else is refused
            # rather than opened through /proc (a fifo would block the loop).
            raise OSError(errno.EINVAL if not stat.S_ISDIR(node.mode) else errno.EISDIR,
                          "not a regular file")
        fd = open_at(_proc(node_fd(node)), -1, (flags & ~_OPEN_STRIP) | os.O_CLOEXEC)
        fh = PosixHandle(fd, node, bool(flags & os.O_APPEND))
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            self._truncate_fd(fd, 0)
        return fh

    async def read(self, fh: PosixHandle, offset: int, size: int) -> bytes:
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
        st = os.fstat(fh.fd)
        size = st.st_size
        end = (size if fh.append else offset) + len(data)
        growth = end - size
        if st.st_nlink == 0:
            # the last name is gone: its bytes left the ledger at unlink
            return os.pwrite(fh.fd, data, offset)
        self.ledger.check_bytes(growth)
        written = os.pwrite(fh.fd, data, offset)
        if growth > 0:
            actual = (size if fh.append else offset) + written - size
            self.ledger.add(bytes_delta=max(0, actual))
        return written

    async def flush(self, fh: PosixHandle) -> None:
        # close() of a duplicate reports deferred write errors (NFS, SMB)
        # without closing the handle the kernel still uses.
        os.close(os.dup(fh.fd))

    async def fsync(self, fh: PosixHandle, datasync: bool) -> None:
        (os.fdatasync if datasync else os.fsync)(fh.fd)

    async def release(self, fh: PosixHandle) -> None:
        os.close(fh.fd)

    def _truncate_fd(self, fd: int, length: int) -> None:
        st = os.fstat(fd)
        old = st.st_size
        if st.st_nlink == 0:
            os.ftruncate(fd, length)
            return
        self.ledger.check_bytes(length - old)
        os.ftruncate(fd, length)
        self.ledger.add(bytes_delta=length - old)

    async def setattr(self, node: PosixNode, changes: AttrChanges,
                      fh: PosixHandle | None) -> Attributes:
        pool.begin()
        path = _proc(node_fd(node))
        is_link = stat.S_ISLNK(node.mode)
        if changes.size is not None:
            if not stat.S_ISREG(node.mode):
                raise OSError(errno.EISDIR if stat.S_ISDIR(node.mode) else errno.EINVAL,
                              "truncate of a non-regular file")
            if fh is not None:
                self._truncate_fd(fh.fd, changes.size)
            else:
                fd = open_at(path, -1, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    self._truncate_fd(fd, changes.size)
                finally:
                    os.close(fd)
        if changes.mode is not None:
            if is_link:
                raise OSError(errno.EOPNOTSUPP, "symlinks have no mode")
            os.chmod(path, stat.S_IMODE(changes.mode))
        if changes.uid is not None or changes.gid is not None:
            os.chown(path, -1 if changes.uid is None else changes.uid,
                     -1 if changes.gid is None else changes.gid)
        if (changes.atime_ns is not None or changes.mtime_ns is not None
                or changes.atime_now or changes.mtime_now):
            st = os.fstat(node_fd(node))
            now = time.time_ns()
            atime = now if changes.atime_now else (
                changes.atime_ns if changes.atime_ns is not None else st.st_atime_ns)
            mtime = now if changes.mtime_now else (
                changes.mtime_ns if changes.mtime_ns is not None else st.st_mtime_ns)
            os.utime(path, ns=(atime, mtime))
        return _attrs(os.fstat(node_fd(node)))

    async def create(self, parent: PosixNode, name: str, mode: int,
                     flags: int) -> tuple[PosixNode, Attributes, PosixHandle]:
        pool.begin()
        self._check(parent, name)
        open_flags = (flags & ~_OPEN_STRIP) | os.O_CLOEXEC | os.O_NOFOLLOW
        created = True
        self.ledger.check_files(1)
        parent_fd = node_fd(parent)
        try:
            fd = open_at(name, parent_fd, open_flags | os.O_CREAT | os.O_EXCL, stat.S_IMODE(mode))
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            fd = open_at(name, parent_fd, open_flags)
            created = False
        try:
            path_fd = open_at(_proc(fd), -1, os.O_PATH | os.O_CLOEXEC)
            st = os.fstat(path_fd)
        except OSError:
            os.close(fd)
            raise
        node = PosixNode(path_fd, st.st_mode, (st.st_dev, st.st_ino), parent, name)
        pool.admit(node)
        self._names.add(node)
        if created:
            self.ledger.add(files_delta=1)
        fh = PosixHandle(fd, node, bool(flags & os.O_APPEND))
        fh.created = created
        if not created and flags & os.O_TRUNC:
            self._truncate_fd(fd, 0)
            st = os.fstat(path_fd)
        return node, _attrs(st), fh

    async def mkdir(self, parent: PosixNode, name: str, mode: int) -> tuple[PosixNode, Attributes]:
        pool.begin()
        self._check(parent, name)
        self.ledger.check_files(1)
        os.mkdir(name, stat.S_IMODE(mode), dir_fd=node_fd(parent))
        self.ledger.add(files_delta=1)
        return self._node_at(parent, name)

    async def mknod(self, parent: PosixNode, name: str, mode: int,
                    rdev: int) -> tuple[PosixNode, Attributes]:
        pool.begin()
        self._check(parent, name)
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            # device nodes would hand a container raw access to the host
            raise OSError(errno.EPERM, "device nodes are not allowed in a vfolder")
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISREG(mode)):
            raise OSError(errno.EINVAL, "unsupported file type")
        self.ledger.check_files(1)
        os.mknod(name, mode, 0, dir_fd=node_fd(parent))
        self.ledger.add(files_delta=1)
        return self._node_at(parent, name)

    async def symlink(self, parent: PosixNode, name: str,
                      target: bytes) -> tuple[PosixNode, Attributes]:
        pool.begin()
        self._check(parent, name)
        self.ledger.check_files(1)
        os.symlink(target, name, dir_fd=node_fd(parent))
        self.ledger.add(files_delta=1)
        return self._node_at(parent, name)

    async def link(self, node: PosixNode, new_parent: PosixNode,
                   new_name: str) -> tuple[PosixNode, Attributes]:
        pool.begin()
        self._check(new_parent, new_name)
        if stat.S_ISDIR(node.mode):
            raise OSError(errno.EPERM, "hard links to directories are not allowed")
        os.link(_proc(node_fd(node)), new_name, dst_dir_fd=node_fd(new_parent),
                follow_symlinks=True)
        return self._node_at(new_parent, new_name)

    def _forget_removed(self, st: os.stat_result) -> None:
        """Accounts for a name removed: the inode goes when its last link does."""
        if stat.S_ISDIR(st.st_mode) or st.st_nlink <= 1:
            self.ledger.add(bytes_delta=-st.st_size if stat.S_ISREG(st.st_mode) else 0,
                            files_delta=-1)

    async def unlink(self, parent: PosixNode, name: str) -> None:
        pool.begin()
        self._check(parent, name)
        st = os.stat(name, dir_fd=node_fd(parent), follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            raise OSError(errno.EISDIR, "is a directory")
        self._names.pin(parent, name)
        os.unlink(name, dir_fd=node_fd(parent))
        self._names.removed(parent, name)
        self._forget_removed(st)

    async def rmdir(self, parent: PosixNode, name: str) -> None:
        pool.begin()
        self._check(parent, name)
        st = os.stat(name, dir_fd=node_fd(parent), follow_symlinks=False)
        self._names.pin(parent, name)
        os.rmdir(name, dir_fd=node_fd(parent))
        self._names.removed(parent, name)
        self._forget_removed(st)

    async def rename(self, old_parent: PosixNode, old_name: str, new_parent: PosixNode,
                     new_name: str, flags: int) -> None:
        pool.begin()
        self._check(old_parent, old_name)
        self._check(new_parent, new_name)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, "unsupported rename flags")
        replaced = None
        self._names.pin(old_parent, old_name)
        self._names.pin(new_parent, new_name)
        if not flags & RENAME_EXCHANGE:
            try:
                replaced = os.stat(new_name, dir_fd=node_fd(new_parent), follow_symlinks=False)
            except FileNotFoundError:
                replaced = None
        if flags:
            if _renameat2 is None:
                raise NotSupported("renameat2 is not available")
            rc = _renameat2(node_fd(old_parent), old_name.encode("utf-8", "surrogateescape"),
                            node_fd(new_parent), new_name.encode("utf-8", "surrogateescape"),
                            flags)
            if rc != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        else:
            os.rename(old_name, new_name, src_dir_fd=node_fd(old_parent),
                      dst_dir_fd=node_fd(new_parent))
        self._names.moved(old_parent, old_name, new_parent, new_name,
                          exchange=bool(flags & RENAME_EXCHANGE))
        if replaced is not None:
            src = os.stat(new_name, dir_fd=node_fd(new_parent), follow_symlinks=False)
            if (src.st_dev, src.st_ino) != (replaced.st_dev, replaced.st_ino):
                self._forget_removed(replaced)

    # ---- xattrs --------------------------------------------------------------
    @staticmethod
    def _xattr_allowed(name: str) -> bool:
        return name.startswith(XATTR_PREFIX)

    async def getxattr(self, node: PosixNode, name: str) -> bytes:
        pool.begin()
        if not self._xattr_allowed(name):
            raise OSError(errno.ENODATA, "no such attribute")
        return os.getxattr(_proc(node_fd(node)), name)

    async def listxattr(self, node: PosixNode) -> list[str]:
        pool.begin()
        if stat.S_ISLNK(node.mode):
            return []
        return [n for n in os.listxattr(_proc(node_fd(node))) if self._xattr_allowed(n)]

    async def setxattr(self, node: PosixNode, name: str, value: bytes) -> None:
        pool.begin()
        if not self._xattr_allowed(name):
            raise OSError(errno.EOPNOTSUPP, "only user.* attributes are supported")
        os.setxattr(_proc(node_fd(node)), name, value)

    async def removexattr(self, node: PosixNode, name: str) -> None:
        pool.begin()
        if not self._xattr_allowed(name):
            raise OSError(errno.EOPNOTSUPP, "only user.* attributes are supported")
        os.removexattr(_proc(node_fd(node)), name)


# (is_dir, is_file, is_symlink) → type bits; 0 = ask stat (fifo, socket, device)
_DTYPE_MODE = {
    (True, False, False): stat.S_IFDIR,
    (False, True, False): stat.S_IFREG,
    (False, False, True): stat.S_IFLNK,
    (False, False, False): 0,
}
