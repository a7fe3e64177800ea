"""The floor of a pyfuse3 daemon: an in-memory filesystem that does no work but answer.

Run as its own process by ``bench/posix_metadata.py`` (the "pyfuse3 floor"
column)::

    python bench/memfs.py MOUNTPOINT

It answers the requests a metadata loop sends (lookup, create, write, flush,
release, getattr, getxattr, readdirplus...) from Python dicts, with the
mount options and cache timeouts of azfs (``default_permissions``,
``allow_other``, 1 s entries and attributes, negative entries), through
the same pyfuse3 and trio.  Whatever it reaches is the most any pyfuse3
daemon can reach on the machine: the time the kernel round trip and
pyfuse3's request loop cost, with no backend behind them.  Not a product
filesystem: no persistence, no permissions of its own, one flat namespace
of directories.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import sys
import time

import pyfuse3
import trio

TIMEOUT = 1.0


class _Node:
    __slots__ = ("mode", "size", "data", "children", "uid", "gid", "mtime_ns")

    def __init__(self, mode: int, uid: int = 0, gid: int = 0) -> None:
        self.mode = mode
        self.uid, self.gid = uid, gid
        self.data = bytearray()
        self.size = 0
        self.children: dict[bytes, int] | None = {} if stat.S_ISDIR(mode) else None
        self.mtime_ns = time.time_ns()


class MemFS(pyfuse3.Operations):
    supports_dot_lookup = False

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[int, _Node] = {pyfuse3.ROOT_INODE: _Node(stat.S_IFDIR | 0o777)}
        self._ino = itertools.count(pyfuse3.ROOT_INODE + 1)
        self._dirs: dict[int, list[tuple[bytes, int]]] = {}
        self._fh = itertools.count(1)

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        n = self.nodes[ino]
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.st_mode = n.mode
        e.st_nlink = 2 if n.children is not None else 1
        e.st_uid, e.st_gid = n.uid, n.gid
        e.st_size = n.size
        e.st_blksize = 4096
        e.st_blocks = (n.size + 511) // 512
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = n.mtime_ns
        e.entry_timeout = e.attr_timeout = TIMEOUT
        return e

    def _child(self, parent: int, name: bytes) -> int:
        children = self.nodes[parent].children
        if children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        ino = children.get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return ino

    async def lookup(self, parent_inode, name, ctx=None):
        try:
            return self._attrs(self._child(parent_inode, name))
        except pyfuse3.FUSEError as exc:
            if exc.errno != errno.ENOENT:
                raise
            e = pyfuse3.EntryAttributes()  # a negative entry, as azfs gives
            e.st_ino = 0
            e.entry_timeout = TIMEOUT
            return e

    async def forget(self, inode_list):
        pass

    async def getattr(self, inode, ctx=None):
        return self._attrs(inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        n = self.nodes[inode]
        if fields.update_size:
            del n.data[attr.st_size:]
            n.data.extend(bytes(attr.st_size - len(n.data)))
            n.size = attr.st_size
        if fields.update_mode:
            n.mode = stat.S_IFMT(n.mode) | stat.S_IMODE(attr.st_mode)
        return self._attrs(inode)

    def _new(self, parent: int, name: bytes, mode: int, ctx) -> int:
        ino = next(self._ino)
        self.nodes[ino] = _Node(mode, ctx.uid, ctx.gid)
        children = self.nodes[parent].children
        assert children is not None
        children[name] = ino
        self.nodes[parent].mtime_ns = time.time_ns()
        return ino

    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._attrs(self._new(parent_inode, name, stat.S_IFDIR | (mode & 0o7777), ctx))

    async def create(self, parent_inode, name, mode, flags, ctx):
        ino = self._new(parent_inode, name, stat.S_IFREG | (mode & 0o7777 & ~ctx.umask), ctx)
        return pyfuse3.FileInfo(fh=ino), self._attrs(ino)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        return bytes(self.nodes[fh].data[off:off + size])

    async def write(self, fh, off, buf):
        n = self.nodes[fh]
        if len(n.data) < off:
            n.data.extend(bytes(off - len(n.data)))
        n.data[off:off + len(buf)] = buf
        n.size = len(n.data)
        n.mtime_ns = time.time_ns()
        return len(buf)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        pass

    async def getxattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def listxattr(self, inode, ctx):
        return []

    async def opendir(self, inode, ctx):
        children = self.nodes[inode].children
        if children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = next(self._fh)
        self._dirs[fh] = list(children.items())
        return fh

    async def readdir(self, fh, start_id, token):
        entries = self._dirs[fh]
        for i in range(start_id, len(entries)):
            name, ino = entries[i]
            if not pyfuse3.readdir_reply(token, name, self._attrs(ino), i + 1):
                return

    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s


def main() -> int:
    mountpoint = sys.argv[1]
    options = set(pyfuse3.default_options) | {"default_permissions", "allow_other",
                                              "fsname=memfs"}
    pyfuse3.init(MemFS(), mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()
    return 0


if __name__ == "__main__":
    os.umask(0)
    sys.exit(main())
