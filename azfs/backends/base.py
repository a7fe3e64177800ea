"""The interface every vfolder backend implements.

A backend serves one vfolder (a directory on a host volume, a blob container
prefix, ...) as a tree of *nodes*.  The FUSE layer (:mod:`azfs.fs`) owns
inode numbers, views, uid/gid presentation and read-only enforcement; a
backend only answers for its own objects, addressed by the opaque
:class:`Node` handles it returned earlier, never by path strings: a backend
resolves one name at a time relative to a parent node, so no path walk can
leave the vfolder.

Backends raise :mod:`azfs.errors` exceptions or ``OSError`` (which carries an
errno) and never import pyfuse3.

Lifetime rules:
* every node returned by :meth:`Backend.lookup`, :meth:`Backend.create`,
  :meth:`Backend.mkdir`, :meth:`Backend.symlink`, :meth:`Backend.mknod`
  and :meth:`Backend.link` is eventually passed to :meth:`Backend.forget`
  exactly once (the FUSE layer de-duplicates nodes with the same
  :attr:`Attributes.key` and forgets the duplicate at once);
* every handle from :meth:`Backend.open`/:meth:`Backend.create` is passed to
  :meth:`Backend.release` once; every directory listing from
  :meth:`Backend.opendir` to :meth:`Backend.releasedir` once.
"""

from __future__ import annotations

import abc
import stat
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from azfs.errors import NotFound, NotSupported, ReadOnly


class Node:
    """Opaque backend handle for one object of a vfolder (subclassed per backend)."""

    __slots__ = ()


class FileHandle:
    """Opaque backend handle for an open file (subclassed per backend)."""

    __slots__ = ()
    #: from :meth:`Backend.create`: False when the name existed already (no new object)
    created: bool = True


@dataclass(slots=True)
class Attributes:
    """What ``stat`` shows of a backend object, before the view maps uid/gid.

    ``key`` identifies the backing object within the backend (hard links share
    it), so the FUSE layer gives every key one inode per view.
    """

    key: Hashable
    mode: int
    size: int = 0
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    blocks: int = 0
    blksize: int = 4096

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)


@dataclass(slots=True)
class AttrChanges:
    """The fields a ``setattr`` asks to change; ``None`` means unchanged."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


@dataclass(slots=True)
class DirEntry:
    """One entry of a directory snapshot (``mode`` only needs the type bits)."""

    name: str
    mode: int


@dataclass(slots=True)
class StatFs:
    block_size: int
    blocks: int
    blocks_free: int
    blocks_avail: int
    files: int
    files_free: int
    name_max: int = 255


@dataclass(slots=True)
class Usage:
    """Bytes and file count of a vfolder, with the quotas that apply (0 = none)."""

    bytes: int
    files: int
    quota_bytes: int = 0
    quota_files: int = 0


class DirListing:
    """A snapshot of a directory taken at ``opendir``.

    FUSE readdir offsets index into the snapshot, so entries created or
    removed while a listing is being read never cause an entry to be skipped
    or returned twice.
    """

    __slots__ = ("entries",)

    def __init__(self, entries: Sequence[DirEntry]) -> None:
        self.entries = entries


class Backend(abc.ABC):
    """One vfolder's store.  Read-only backends need only the read half."""

    #: True when the store itself can never be written (a blob dataset).
    read_only: bool = False
    #: seconds the kernel may cache the backend's entries and attributes, when the
    #: store says (a dataset's listing TTL); None: the filesystem's default
    cache_timeout: float | None = None

    # ---- lifecycle -------------------------------------------------------
    async def start(self) -> None:
        """Called once before the first request (open connections, load state)."""

    async def close(self) -> None:
        """Called once after the last request (persist state, close connections)."""

    async def tick(self) -> None:
        """Called about twice a second while the backend serves (persist state)."""

    # ---- tree --------------------------------------------------------------
    @abc.abstractmethod
    def root(self) -> Node:
        """The vfolder's root node; never forgotten."""

    @abc.abstractmethod
    async def lookup(self, parent: Node, name: str) -> tuple[Node, Attributes]: ...

    async def lookup_batch(self, parent: Node, names: Sequence[str]
                           ) -> list[tuple[Node, Attributes] | None]:
        """:meth:`lookup` of many names (readdirplus), aligned with ``names``.

        ``None`` for a name that no longer exists.  A backend whose store answers
        slowly overrides this to look them up in one call.
        """
        out: list[tuple[Node, Attributes] | None] = []
        for name in names:
            try:
                out.append(await self.lookup(parent, name))
            except (FileNotFoundError, NotFound):
                out.append(None)
        return out

    @abc.abstractmethod
    async def getattr(self, node: Node) -> Attributes: ...

    @abc.abstractmethod
    async def opendir(self, node: Node) -> DirListing: ...

    async def releasedir(self, listing: DirListing) -> None:
        return None

    def forget(self, node: Node) -> None:
        """Releases whatever the node holds (a file descriptor, a cache entry)."""

    def adopt(self, existing: Node, new: Node) -> None:
        """A lookup returned ``new`` for an object already known as ``existing``.

        The FUSE layer keeps ``existing`` (the kernel knows its inode); a backend may
        refresh it from ``new`` (a current name), then must release ``new``.
        """
        self.forget(new)

    async def readlink(self, node: Node) -> bytes:
        raise NotSupported("readlink")

    async def statfs(self) -> StatFs:
        return StatFs(block_size=4096, blocks=0, blocks_free=0, blocks_avail=0,
                      files=0, files_free=0)

    async def usage(self) -> Usage:
        raise NotSupported("this backend does not account usage")

    def usage_now(self) -> Usage | None:
        """The usage as counted in memory right now (no call to the store); None if
        this backend does not count it."""
        return None

    def set_quota(self, quota_bytes: int, quota_files: int) -> None:
        """New limits for a live backend (a vfolder's quota changed at a re-export)."""
        raise NotSupported("this backend has no quota")

    def stats(self) -> dict[str, Any]:
        """The backend's own counters (requests, cache hits) for metrics; {} if none."""
        return {}

    def refresh(self, path: str | None = None) -> None:
        """Forgets what is cached of the store (all, or below ``path``)."""
        raise NotSupported("this backend caches nothing to refresh")

    # ---- reading -----------------------------------------------------------
    @abc.abstractmethod
    async def open(self, node: Node, flags: int) -> FileHandle: ...

    @abc.abstractmethod
    async def read(self, fh: FileHandle, offset: int, size: int) -> bytes: ...

    async def release(self, fh: FileHandle) -> None:
        return None

    async def release_attrs(self, fh: FileHandle) -> Attributes | None:
        """:meth:`release`, and the file's attributes after it if they come cheaply."""
        await self.release(fh)
        return None

    async def flush(self, fh: FileHandle) -> None:
        return None

    async def fsync(self, fh: FileHandle, datasync: bool) -> None:
        return None

    async def getxattr(self, node: Node, name: str) -> bytes:
        raise NotSupported("xattrs")

    async def listxattr(self, node: Node) -> list[str]:
        return []

    # ---- writing (read-only backends keep these defaults) ------------------
    async def write(self, fh: FileHandle, offset: int, data: bytes) -> int:
        raise ReadOnly("read-only backend")

    async def setattr(self, node: Node, changes: AttrChanges,
                      fh: FileHandle | None) -> Attributes:
        raise ReadOnly("read-only backend")

    async def create(self, parent: Node, name: str, mode: int,
                     flags: int) -> tuple[Node, Attributes, FileHandle]:
        raise ReadOnly("read-only backend")

    async def mkdir(self, parent: Node, name: str, mode: int) -> tuple[Node, Attributes]:
        raise ReadOnly("read-only backend")

    async def mknod(self, parent: Node, name: str, mode: int,
                    rdev: int) -> tuple[Node, Attributes]:
        raise ReadOnly("read-only backend")

    async def symlink(self, parent: Node, name: str,
                      target: bytes) -> tuple[Node, Attributes]:
        raise ReadOnly("read-only backend")

    async def link(self, node: Node, new_parent: Node,
                   new_name: str) -> tuple[Node, Attributes]:
        raise ReadOnly("read-only backend")

    async def unlink(self, parent: Node, name: str) -> None:
        raise ReadOnly("read-only backend")

    async def rmdir(self, parent: Node, name: str) -> None:
        raise ReadOnly("read-only backend")

    async def rename(self, old_parent: Node, old_name: str, new_parent: Node,
                     new_name: str, flags: int) -> None:
        raise ReadOnly("read-only backend")

    async def setxattr(self, node: Node, name: str, value: bytes) -> None:
        raise ReadOnly("read-only backend")

    async def removexattr(self, node: Node, name: str) -> None:
        raise ReadOnly("read-only backend")
