"""pyfuse3 Operations: links FUSE requests to views and their backends.

This module only translates: names to ``str``, backend :class:`Attributes`
to ``EntryAttributes`` as the view presents them (uid/gid), read-only views
to ``EROFS``; everything the data looks like is the backend's business.
Every handler goes through :func:`azfs.fs.errno_map.fuse_op`.

Namespace: either one view at the root (``azfs mount``), or virtual
directories holding view roots (the agent: ``/kernels/<id>/<alias>``),
changed at run time with :meth:`AzfsOperations.attach` / ``detach``.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import time
from collections.abc import Sequence

import pyfuse3
import trio

from azfs.backends.base import (
    AttrChanges,
    Attributes,
    Backend,
    DirListing,
    FileHandle,
    StatFs,
)
from azfs.errors import NotFound, StaleObject
from azfs.fs.errno_map import fuse_op
from azfs.fs.inodes import ROOT_INODE, Inode, InodeTable, LookupUnderflow, View
from azfs.fs.stats import OpStats

log = logging.getLogger("azfs.fs")

stats = OpStats()
op = fuse_op(stats)
_housekeeping_limiter = trio.CapacityLimiter(4)

#: seconds the kernel may cache entries and attributes.  Changes made through
#: the same view are always seen at once (the kernel updates its own caches);
#: the timeout bounds staleness of changes made by other views or the host.
DEFAULT_CACHE_TIMEOUT = 1.0
#: the namespace of the node agent holds many vfolders: no numbers of its own
_NO_STATFS = StatFs(block_size=4096, blocks=0, blocks_free=0, blocks_avail=0, files=0,
                    files_free=0)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND
#: missing names remembered per directory, to drop the kernel's negative entries
#: of them on a refresh (older ones expire with their timeout)
_MISSING_PER_DIR = 4096


def _name(raw: bytes) -> str:
    return os.fsdecode(raw)


def _invalidate(inodes: Sequence[int], entries: Sequence[tuple[int, str]],
                attrs: Sequence[int] = ()) -> None:
    """Runs in a thread: the kernel may wait on this very process to answer.

    ``inodes`` lose their attributes and page cache, ``attrs`` only their attributes.
    """
    for ino, attr_only in [(i, False) for i in inodes] + [(i, True) for i in attrs]:
        try:
            pyfuse3.invalidate_inode(ino, attr_only)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EBADF):
                log.debug("invalidate_inode(%d): %s", ino, exc)
    for parent, name in entries:
        try:
            pyfuse3.invalidate_entry(parent, os.fsencode(name))
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EBADF):
                log.debug("invalidate_entry(%d, %r): %s", parent, name, exc)


class _OpenFile:
    __slots__ = ("inode", "view", "handle")

    def __init__(self, inode: Inode, view: View, handle: FileHandle) -> None:
        self.inode = inode
        self.view = view
        self.handle = handle


class _OpenDir:
    __slots__ = ("inode", "listing", "virtual", "read", "batch", "sized")

    def __init__(self, inode: Inode, listing: DirListing | None,
                 virtual: list[tuple[str, int]] | None) -> None:
        self.inode = inode
        self.listing = listing
        self.virtual = virtual
        #: a listing was served already: offset 0 again means rewinddir()
        self.read = False
        #: entries looked up per call to the volume (adapts to the kernel's buffer)
        self.batch = 128
        #: the kernel's buffer overflowed once: ``batch`` is what fits
        self.sized = False


class AzfsOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, root_view: View | None = None,
                 cache_timeout: float = DEFAULT_CACHE_TIMEOUT, xattrs: bool = False) -> None:
        super().__init__()
        self.table = InodeTable()
        self.cache_timeout = cache_timeout
        #: extended attributes served (``user.*``); off, the kernel answers EOPNOTSUPP
        #: itself and stops asking (see :meth:`_xattrs_off`)
        self.xattrs = xattrs
        if root_view is not None:
            self.table.new_view(root_view)
        self.root_view = root_view
        #: live views, for housekeeping (usage persistence) and metrics
        self.views: set[View] = {root_view} if root_view is not None else set()
        self.table.set_root(root_view)
        self._files: dict[int, _OpenFile] = {}
        self._dirs: dict[int, _OpenDir] = {}
        self._fh = itertools.count(1)
        #: other views' inodes and entries to drop from the kernel's caches, coalesced:
        #: an inode written a thousand times is invalidated once, and nothing is dropped
        self._stale_inodes: dict[int, None] = {}
        self._stale_entries: dict[tuple[int, str], None] = {}
        self._stale_wakeup = trio.Event()
        self.stats = stats
        #: kernel lookup counts that went below zero (a bookkeeping bug if ever > 0)
        self.forget_underflows = 0

    # ---- namespace (agent) -------------------------------------------------------
    def attach(self, path: Sequence[str], view: View) -> int:
        """Shows ``view`` at ``path`` (virtual parents created); returns its inode."""
        parent = self.table.get(ROOT_INODE)
        if not parent.is_virtual:
            raise ValueError("this filesystem serves a single vfolder at its root")
        for comp in path[:-1]:
            assert parent.children is not None
            ino = parent.children.get(comp)
            parent = self.table.get(ino) if ino else self.table.add_virtual(parent, comp)
            if not parent.is_virtual:
                raise ValueError(f"{'/'.join(path)}: a view is in the way")
        assert parent.children is not None
        if path[-1] in parent.children:
            raise FileExistsError(f"{'/'.join(path)} is already attached")
        self.table.new_view(view)
        inode = self.table.add_view_root(parent, path[-1], view)
        self.views.add(view)
        self._invalidate_entry(parent.ino, path[-1])
        return inode.ino

    def detach(self, path: Sequence[str]) -> View | None:
        """Removes whatever is at ``path``; handles on it then get ESTALE."""
        parent = self.table.get(ROOT_INODE)
        for comp in path[:-1]:
            ino = (parent.children or {}).get(comp)
            if ino is None:
                return None
            parent = self.table.get(ino)
        child_ino = (parent.children or {}).get(path[-1])
        if child_ino is None:
            return None
        child = self.table.get(child_ino)
        views: list[View] = []
        self._collect_views(child, views)
        for v in views:
            v.alive = False
            self.views.discard(v)
        self.table.detach(parent, path[-1])
        self._invalidate_entry(parent.ino, path[-1])
        # prune now-empty virtual parents
        while parent.ino != ROOT_INODE and parent.is_virtual and not parent.children:
            grand = self.table.get(parent.parent)
            self.table.detach(grand, parent.name)
            self._invalidate_entry(grand.ino, parent.name)
            parent = grand
        return views[0] if views else None

    def _collect_views(self, inode: Inode, out: list[View]) -> None:
        if inode.view is not None:
            out.append(inode.view)
            return
        for ino in list((inode.children or {}).values()):
            self._collect_views(self.table.get(ino), out)

    def _invalidate_entry(self, parent: int, name: str) -> None:
        try:
            pyfuse3.invalidate_entry_async(parent, os.fsencode(name), ignore_enoent=True)
        except Exception:  # noqa: BLE001 - not mounted yet: nothing cached
            pass

    async def run_invalidator(self) -> None:
        """Background task: drops other views' caches of objects changed here."""
        while True:
            await self._stale_wakeup.wait()
            self._stale_wakeup = trio.Event()
            inodes, self._stale_inodes = self._stale_inodes, {}
            entries, self._stale_entries = self._stale_entries, {}
            if inodes or entries:
                await trio.to_thread.run_sync(_invalidate, list(inodes), list(entries))

    async def refresh(self, backend: Backend, path: str | None = None) -> None:
        """A dataset's explicit refresh: its listings, and what the kernel was told of them.

        The kernel trusts entries and attributes for the listing TTL; once this
        returns it asks again: every name of the backend's views it was told
        of, present or missing, is dropped, and every inode's attributes.  Page caches stay:
        an ``open`` keeps one only if the file's size and time are unchanged.
        """
        backend.refresh(path)
        attrs: list[int] = []
        entries: list[tuple[int, str]] = []
        for inode in self.table.of_backend(backend):
            inode.cached_at = 0.0
            attrs.append(inode.ino)
            entries += [(inode.ino, name) for name in [*(inode.kids or ()),
                                                      *(inode.missing or ())]]
            inode.missing = None
        # done when this returns: the next access after a refresh sees the new state
        await trio.to_thread.run_sync(_invalidate, [], entries, attrs)

    async def run_housekeeping(self, interval: float = 0.5) -> None:
        """Background task: lets backends persist state (usage ledgers) periodically.

        A backend's tick does its I/O through its volume's workers (a hung volume
        holds only its own threads); a backend whose previous tick is still
        running is skipped.
        """
        busy: set[int] = set()

        async def tick(backend: Backend) -> None:
            try:
                await backend.tick()
            except Exception as exc:  # noqa: BLE001 - housekeeping must not end the fs
                log.warning("housekeeping of %r failed: %s", backend, exc)
            finally:
                busy.discard(id(backend))

        async with trio.open_nursery() as nursery:
            while True:
                await trio.sleep(interval)
                for backend in {v.backend for v in self.views}:
                    if id(backend) in busy:
                        continue
                    busy.add(id(backend))
                    nursery.start_soon(tick, backend)

    def _changed(self, inode: Inode) -> None:
        """The object's data or size changed: other views must not serve their cache."""
        inode.cached_at = 0.0
        others = self._stale_siblings(inode)
        if others:
            self._stale_inodes.update(dict.fromkeys(o.ino for o in others))
            self._stale_wakeup.set()

    def _name_changed(self, parent: Inode, name: str) -> None:
        """A name appeared or went: other views may cache it (as missing, or as it was).

        The directory's own times and link count changed too: no listing may
        repeat its attributes from before.
        """
        parent.cached_at = 0.0
        others = self._stale_siblings(parent)
        for other in others:
            if other.kids is not None:
                other.kids.pop(name, None)
            if other.missing is not None:
                other.missing.pop(name, None)
        if others:
            self._stale_entries.update(dict.fromkeys((o.ino, name) for o in others))
            self._stale_wakeup.set()

    def _stale_siblings(self, inode: Inode) -> list[Inode]:
        """The object's inodes in other views, whose attributes may no longer be repeated."""
        out = []
        for ino in self.table.siblings(inode):
            other = self.table.find_ino(ino)
            if other is not None:
                other.cached_at = 0.0
                out.append(other)
        return out

    def bookkeeping(self) -> dict[str, int]:
        """Sizes that must return to their baseline when the kernel forgets (tests, metrics)."""
        return {"inodes": len(self.table), "open_files": len(self._files),
                "open_dirs": len(self._dirs), "forget_underflows": self.forget_underflows}

    # ---- attribute presentation -------------------------------------------------
    def _entry(self, inode: Inode, attrs: Attributes) -> pyfuse3.EntryAttributes:
        """Fresh attributes for the kernel (remembered for listings that follow)."""
        inode.cached = attrs
        inode.cached_at = time.monotonic()
        return self._build(inode, attrs)

    def _build(self, inode: Inode, attrs: Attributes) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode.ino
        e.generation = 0
        e.entry_timeout = e.attr_timeout = self._timeout(inode.view)
        e.st_mode = attrs.mode
        e.st_nlink = attrs.nlink
        view = inode.view
        e.st_uid = view.uid if view is not None and view.uid is not None else attrs.uid
        e.st_gid = view.gid if view is not None and view.gid is not None else attrs.gid
        e.st_rdev = attrs.rdev
        e.st_size = attrs.size
        e.st_blksize = attrs.blksize
        e.st_blocks = attrs.blocks
        e.st_atime_ns = attrs.atime_ns
        e.st_mtime_ns = attrs.mtime_ns
        e.st_ctime_ns = attrs.ctime_ns
        return e

    async def _attrs(self, inode: Inode) -> Attributes:
        if inode.is_virtual:
            assert inode.attrs is not None
            return inode.attrs
        assert inode.view is not None
        return await inode.view.backend.getattr(inode.node)

    def _node(self, ino: int) -> tuple[Inode, View, Backend]:
        inode = self.table.get(ino)
        if inode.view is None:
            raise pyfuse3.FUSEError(errno.EISDIR if inode.children is not None else errno.EIO)
        return inode, inode.view, inode.view.backend

    def _writable(self, ino: int) -> tuple[Inode, View, Backend]:
        inode = self.table.get(ino)
        if inode.view is None:
            raise pyfuse3.FUSEError(errno.EACCES)
        if inode.view.read_only or inode.view.backend.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        return inode, inode.view, inode.view.backend

    def _remember(self, parent: Inode, name: str, view: View, node,
                  attrs: Attributes) -> pyfuse3.EntryAttributes:
        inode = self.table.add_node(view, node, attrs)
        inode.lookups += 1
        self._link(parent, name, inode)
        return self._entry(inode, attrs)

    @staticmethod
    def _link(parent: Inode, name: str, inode: Inode) -> None:
        inode.parent = parent.ino
        if parent.kids is None:
            parent.kids = {}
        parent.kids[name] = inode.ino
        if parent.missing:
            parent.missing.pop(name, None)

    def _unlink_name(self, parent: Inode, name: str) -> None:
        if parent.kids is not None:
            ino = parent.kids.pop(name, None)
            child = self.table.find_ino(ino) if ino is not None else None
            if child is not None:
                child.cached_at = 0.0  # its link count changed

    # ---- lookups and attributes -------------------------------------------------
    def _timeout(self, view: View | None) -> float:
        if view is not None and view.cache_timeout is not None:
            return view.cache_timeout
        return self.cache_timeout

    def _missing(self, timeout: float) -> pyfuse3.EntryAttributes:
        """A negative entry: the kernel remembers the name is missing for the timeout.

        Programs probe many names that do not exist (imports, loaders, ``git``);
        a name created through another view of the same vfolder invalidates it.
        """
        e = pyfuse3.EntryAttributes()
        e.st_ino = 0
        e.entry_timeout = timeout
        return e

    @staticmethod
    def _remember_missing(parent: Inode, name: str) -> None:
        if parent.missing is None:
            parent.missing = {}
        elif len(parent.missing) >= _MISSING_PER_DIR:
            del parent.missing[next(iter(parent.missing))]
        parent.missing[name] = None

    @op
    async def lookup(self, parent_inode: int, name: bytes, ctx=None) -> pyfuse3.EntryAttributes:
        parent = self.table.get(parent_inode)
        sname = _name(name)
        if parent.is_virtual:
            ino = (parent.children or {}).get(sname)
            if ino is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            child = self.table.get(ino)
            child.lookups += 1
            return self._entry(child, await self._attrs(child))
        assert parent.view is not None
        try:
            node, attrs = await parent.view.backend.lookup(parent.node, sname)
        except (FileNotFoundError, NotFound):
            timeout = self._timeout(parent.view)
            if timeout > 0:
                self._remember_missing(parent, sname)
                return self._missing(timeout)
            raise
        return self._remember(parent, sname, parent.view, node, attrs)

    @op
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            try:
                self.table.forget(ino, count)
            except LookupUnderflow as exc:
                self.forget_underflows += 1
                log.error("inode bookkeeping is wrong: %s", exc)

    @op
    async def getattr(self, inode: int, ctx=None) -> pyfuse3.EntryAttributes:
        node = self.table.get(inode)
        return self._entry(node, await self._attrs(node))

    @op
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node, view, backend = self._writable(inode)
        changes = AttrChanges()
        if fields.update_mode:
            changes.mode = attr.st_mode
        if fields.update_uid or fields.update_gid:
            if view.uid is not None or view.gid is not None:
                # ownership is presented, not stored: only a no-op chown is accepted
                if (fields.update_uid and attr.st_uid != view.uid) or \
                        (fields.update_gid and attr.st_gid != view.gid):
                    raise pyfuse3.FUSEError(errno.EPERM)
            else:
                changes.uid = attr.st_uid if fields.update_uid else None
                changes.gid = attr.st_gid if fields.update_gid else None
        if fields.update_size:
            changes.size = attr.st_size
        if fields.update_atime:
            changes.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            changes.mtime_ns = attr.st_mtime_ns
        handle = self._files[fh].handle if fh is not None and fh in self._files else None
        attrs = await backend.setattr(node.node, changes, handle)
        if fields.update_size:
            node.stamp = (attrs.mtime_ns, attrs.size)
            self._changed(node)
        return self._entry(node, attrs)

    @op
    async def readlink(self, inode: int, ctx=None) -> bytes:
        node, _, backend = self._node(inode)
        return await backend.readlink(node.node)

    @op
    async def statfs(self, ctx=None) -> pyfuse3.StatvfsData:
        out = pyfuse3.StatvfsData()
        if self.root_view is not None:
            s = await self.root_view.backend.statfs()
        else:
            s = _NO_STATFS
        out.f_bsize = s.block_size
        out.f_frsize = s.block_size
        out.f_blocks = s.blocks
        out.f_bfree = s.blocks_free
        out.f_bavail = s.blocks_avail
        out.f_files = s.files
        out.f_ffree = s.files_free
        out.f_favail = s.files_free
        out.f_namemax = s.name_max
        return out

    # ---- directories ---------------------------------------------------------------
    @op
    async def opendir(self, inode: int, ctx=None) -> int:
        node = self.table.get(inode)
        if node.is_virtual:
            entry = _OpenDir(node, None, sorted((node.children or {}).items()))
        else:
            assert node.view is not None
            listing = await node.view.backend.opendir(node.node)
            entry = _OpenDir(node, listing, None)
        node.opens += 1
        fh = next(self._fh)
        self._dirs[fh] = entry
        return fh

    def _dot(self, ino: int) -> pyfuse3.EntryAttributes:
        """'.' and '..': the kernel takes only their inode number and type from a listing."""
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.st_mode = stat.S_IFDIR | 0o755
        return e

    @op
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """Positions: 0 is '.', 1 is '..', 2+i the i-th entry of the opendir snapshot."""
        d = self._dirs[fh]
        if start_id == 0 and d.read:
            await self._refresh(d)
        d.read = True
        pos = start_id
        while pos < 2:
            ino = d.inode.ino if pos == 0 else (
                d.inode.parent if d.inode.parent in self.table else d.inode.ino)
            if not pyfuse3.readdir_reply(token, b"." * (pos + 1), self._dot(ino), pos + 1):
                return
            pos += 1
        if d.virtual is not None:
            for i in range(pos - 2, len(d.virtual)):
                name, ino = d.virtual[i]
                try:
                    child = self.table.get(ino)
                except StaleObject:
                    continue  # detached meanwhile
                if not pyfuse3.readdir_reply(token, os.fsencode(name),
                                             self._entry(child, await self._attrs(child)), i + 3):
                    return
                child.lookups += 1
            return
        assert d.listing is not None and d.inode.view is not None
        view = d.inode.view
        entries = d.listing.entries
        i = pos - 2
        while i < len(entries):
            names = [e.name for e in entries[i:i + d.batch]]
            found = await self._entries(d.inode, view, names)
            for j, item in enumerate(found):
                if item is None:
                    continue  # removed since opendir: not listed
                inode, entry = item
                if not pyfuse3.readdir_reply(token, os.fsencode(names[j]), entry, i + j + 3):
                    self.table.drop_unreferenced(inode.ino)
                    for rest in found[j + 1:]:
                        if rest is not None:
                            self.table.drop_unreferenced(rest[0].ino)
                    d.batch, d.sized = max(8, j + 4), True
                    return
                inode.lookups += 1
            i += len(names)
            if not d.sized:  # all of it fitted: a bigger buffer than thought
                d.batch = min(2 * d.batch, 1024)

    async def _entries(self, directory: Inode, view: View, names: list[str]
                       ) -> list[tuple[Inode, pyfuse3.EntryAttributes] | None]:
        """Inodes and entries of a listing's names, aligned with ``names``.

        A name listed or looked up here within the cache timeout is answered
        from what the kernel was told then (the kernel would trust it as long);
        the others are looked up in one call to the volume.
        """
        out: list[tuple[Inode, pyfuse3.EntryAttributes] | None] = [None] * len(names)
        missing: list[int] = []
        kids = directory.kids or {}
        fresh_after = time.monotonic() - self._timeout(view)
        for j, name in enumerate(names):
            ino = kids.get(name)
            inode = self.table.find_ino(ino) if ino is not None else None
            if inode is not None and inode.cached is not None and inode.cached_at > fresh_after:
                out[j] = (inode, self._build(inode, inode.cached))
            else:
                missing.append(j)
        if missing:
            found = await view.backend.lookup_batch(directory.node,
                                                    [names[j] for j in missing])
            for j, item in zip(missing, found, strict=True):
                if item is None:
                    continue
                node, attrs = item
                inode = self.table.add_node(view, node, attrs)
                self._link(directory, names[j], inode)
                out[j] = (inode, self._entry(inode, attrs))
        return out

    async def _refresh(self, d: _OpenDir) -> None:
        """A new snapshot for rewinddir(), which must see the directory as it is now."""
        if d.virtual is not None:
            d.virtual = sorted((d.inode.children or {}).items())
            return
        assert d.inode.view is not None and d.listing is not None
        backend = d.inode.view.backend
        old = d.listing
        d.listing = await backend.opendir(d.inode.node)
        await backend.releasedir(old)

    @op
    async def releasedir(self, fh: int) -> None:
        d = self._dirs.pop(fh)
        if d.listing is not None and d.inode.view is not None:
            await d.inode.view.backend.releasedir(d.listing)
        self.table.closed(d.inode)

    @op
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    @op
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent, view, backend = self._writable(parent_inode)
        node, attrs = await backend.mkdir(parent.node, _name(name), mode & ~ctx.umask)
        self._name_changed(parent, _name(name))
        attrs = await self._own(view, backend, node, attrs, ctx)
        return self._remember(parent, _name(name), view, node, attrs)

    @op
    async def rmdir(self, parent_inode: int, name: bytes, ctx=None) -> None:
        parent, _, backend = self._writable(parent_inode)
        await backend.rmdir(parent.node, _name(name))
        self._unlink_name(parent, _name(name))
        self._name_changed(parent, _name(name))

    # ---- names -----------------------------------------------------------------------
    async def _own(self, view: View, backend: Backend, node, attrs: Attributes,
                   ctx: pyfuse3.RequestContext) -> Attributes:
        """New objects belong to the caller when the view shows real ownership."""
        if view.uid is not None or (attrs.uid == ctx.uid and attrs.gid == ctx.gid):
            return attrs
        try:
            return await backend.setattr(node, AttrChanges(uid=ctx.uid, gid=ctx.gid), None)
        except OSError as exc:  # a volume that cannot chown (cifs with uid=) keeps its owner
            log.debug("cannot give new object to %d:%d: %s", ctx.uid, ctx.gid, exc)
            return attrs

    @op
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent, view, backend = self._writable(parent_inode)
        node, attrs = await backend.mknod(parent.node, _name(name),
                                          (mode & ~ctx.umask) | stat.S_IFMT(mode), rdev)
        self._name_changed(parent, _name(name))
        attrs = await self._own(view, backend, node, attrs, ctx)
        return self._remember(parent, _name(name), view, node, attrs)

    @op
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent, view, backend = self._writable(parent_inode)
        node, attrs = await backend.symlink(parent.node, _name(name), target)
        self._name_changed(parent, _name(name))
        attrs = await self._own(view, backend, node, attrs, ctx)
        return self._remember(parent, _name(name), view, node, attrs)

    @op
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx=None) -> pyfuse3.EntryAttributes:
        node, view, backend = self._writable(inode)
        parent = self.table.get(new_parent_inode)
        if parent.view is not view:
            raise pyfuse3.FUSEError(errno.EXDEV)
        new_node, attrs = await backend.link(node.node, parent.node, _name(new_name))
        self._name_changed(parent, _name(new_name))
        return self._remember(parent, _name(new_name), view, new_node, attrs)

    @op
    async def unlink(self, parent_inode: int, name: bytes, ctx=None) -> None:
        parent, _, backend = self._writable(parent_inode)
        await backend.unlink(parent.node, _name(name))
        self._unlink_name(parent, _name(name))
        self._name_changed(parent, _name(name))

    @op
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx=None) -> None:
        old, view, backend = self._writable(parent_inode_old)
        new = self.table.get(parent_inode_new)
        if new.view is not view:
            raise pyfuse3.FUSEError(errno.EXDEV)
        await backend.rename(old.node, _name(name_old), new.node, _name(name_new), flags)
        for directory, n in ((old, _name(name_old)), (new, _name(name_new))):
            self._unlink_name(directory, n)
            self._name_changed(directory, n)

    # ---- files -------------------------------------------------------------------------
    def _keep_cache(self, inode: Inode, attrs: Attributes) -> bool:
        """Keep the page cache only if the object did not change since it was filled."""
        stamp = (attrs.mtime_ns, attrs.size)
        keep = inode.stamp == stamp
        inode.stamp = stamp
        return keep

    @op
    async def open(self, inode: int, flags: int, ctx=None) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            node, view, backend = self._writable(inode)
        else:
            node, view, backend = self._node(inode)
        handle = await backend.open(node.node, flags)
        try:
            attrs = await backend.getattr(node.node)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._release_quietly(backend, handle)
            raise
        node.opens += 1
        fh = next(self._fh)
        self._files[fh] = _OpenFile(node, view, handle)
        if flags & os.O_TRUNC:
            self._changed(node)
        return pyfuse3.FileInfo(fh=fh, keep_cache=self._keep_cache(node, attrs))

    @staticmethod
    async def _release_quietly(backend: Backend, handle: FileHandle) -> None:
        try:
            await backend.release(handle)
        except Exception as exc:  # noqa: BLE001 - the first error is the one to report
            log.warning("release after a failed open: %s", exc)

    @op
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent, view, backend = self._writable(parent_inode)
        node, attrs, handle = await backend.create(parent.node, _name(name),
                                                   mode & ~ctx.umask, flags)
        if handle.created:  # an existing file keeps its owner
            self._name_changed(parent, _name(name))
            attrs = await self._own(view, backend, node, attrs, ctx)
        entry = self._remember(parent, _name(name), view, node, attrs)
        inode = self.table.get(entry.st_ino)
        inode.opens += 1
        inode.stamp = (attrs.mtime_ns, attrs.size)
        fh = next(self._fh)
        self._files[fh] = _OpenFile(inode, view, handle)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), entry

    def _open_file(self, fh: int) -> _OpenFile:
        """A handle and a live view to call through.

        A handle on a shared file works while any view still shows the file
        (the kernel's open does not say through which view it came); once none
        does, :class:`StaleObject` (ESTALE).
        """
        f = self._files[fh]
        if not f.view.alive:
            f.view = self.table.live_view(f.inode)
        return f

    @op
    async def read(self, fh: int, off: int, size: int) -> bytes:
        f = self._open_file(fh)
        data = await f.view.backend.read(f.handle, off, size)
        self.stats.bytes_read[f.view.label] += len(data)
        return data

    @op
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        f = self._open_file(fh)
        if f.view.read_only or f.view.backend.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        n = await f.view.backend.write(f.handle, off, buf)
        self.stats.bytes_written[f.view.label] += n
        f.inode.stamp = None  # refreshed at the next open; our own writes are cached
        self._changed(f.inode)
        return n

    @op
    async def flush(self, fh: int) -> None:
        f = self._files[fh]
        await f.view.backend.flush(f.handle)

    @op
    async def fsync(self, fh: int, datasync: bool) -> None:
        f = self._files[fh]
        await f.view.backend.fsync(f.handle, datasync)

    @op
    async def release(self, fh: int) -> None:
        f = self._files.pop(fh)
        try:
            if f.inode.stamp is None and f.view.alive:
                # writes went through our page cache: it matches the file now
                attrs = await f.view.backend.release_attrs(f.handle)
                if attrs is not None:
                    f.inode.stamp = (attrs.mtime_ns, attrs.size)
            else:
                await f.view.backend.release(f.handle)
        finally:
            # whatever the volume answered, the kernel's handle is gone
            self.table.closed(f.inode)

    # ---- xattrs --------------------------------------------------------------------------
    def _xattrs_off(self) -> None:
        """ENOSYS when extended attributes are off: the kernel then stops sending them.

        With them on, every ``write()`` costs a second request (the kernel's
        ``security.capability`` check) and ``ls -l`` two more per file
        (``security.selinux``, ``system.posix_acl_access``); see PERFORMANCE.md.
        """
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)

    @op
    async def getxattr(self, inode: int, name: bytes, ctx=None) -> bytes:
        self._xattrs_off()
        node = self.table.get(inode)
        if node.view is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return await node.view.backend.getxattr(node.node, _name(name))

    @op
    async def listxattr(self, inode: int, ctx=None) -> list[bytes]:
        self._xattrs_off()
        node = self.table.get(inode)
        if node.view is None:
            return []
        return [os.fsencode(n) for n in await node.view.backend.listxattr(node.node)]

    @op
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx=None) -> None:
        self._xattrs_off()
        node, _, backend = self._writable(inode)
        await backend.setxattr(node.node, _name(name), value)

    @op
    async def removexattr(self, inode: int, name: bytes, ctx=None) -> None:
        self._xattrs_off()
        node, _, backend = self._writable(inode)
        await backend.removexattr(node.node, _name(name))
