"""FUSE inode bookkeeping: which inode is which backend node of which view.

A *view* is one vfolder as one kernel (or one admin mount) sees it: a backend
plus presentation options (read-only, uid/gid).  A backing object gets one
inode per view, keyed by ``(view id, backend key)`` (two kernels that see the
same vfolder with different modes must not share attribute or page caches),
with one exception: read-only views of one backend that present it the same
way (:attr:`View.presentation`) share the inodes of its files, so the kernel
keeps one page cache of a dataset file for every kernel reading it (eight
training jobs on one node hold a dataset once, and the second one reads it
from memory).  Directories are never shared: the kernel allows a directory
inode one name only.  Virtual directories (the root, ``/kernels/<id>``...)
hold named children.

Invariant: an inode stays in the table while the kernel holds lookups on it
or a handle is open on it; the backend node is forgotten exactly once, when
both reach zero.
"""

from __future__ import annotations

import itertools
import stat
import time
from collections.abc import Hashable
from dataclasses import dataclass, field

from azfs.backends.base import Attributes, Backend, Node
from azfs.errors import StaleObject

ROOT_INODE = 1


class LookupUnderflow(Exception):
    """The kernel forgot more lookups of an inode than it was given."""


@dataclass(eq=False)
class View:
    """One presentation of a backend in the namespace."""

    label: str
    backend: Backend
    read_only: bool = False
    uid: int | None = None
    gid: int | None = None
    #: seconds the kernel may cache this view's entries and attributes (None: the
    #: filesystem's default); a blob dataset's listing TTL
    cache_timeout: float | None = None
    id: int = 0
    alive: bool = True
    #: inodes of this view currently in the table (for teardown)
    inodes: set[int] = field(default_factory=set)

    @property
    def presentation(self) -> Hashable | None:
        """Views with equal keys show a file identically and may share its inode.

        Read-only views only: a writable view keeps inodes of its own, whose
        writes invalidate the other views' caches.
        """
        if not (self.read_only or self.backend.read_only):
            return None
        return (id(self.backend), self.uid, self.gid, self.cache_timeout)


class Inode:
    __slots__ = ("ino", "lookups", "opens", "view", "node", "key", "children", "name",
                 "parent", "stamp", "attrs", "cached", "cached_at", "kids", "missing",
                 "sharers", "table_key")

    def __init__(self, ino: int, view: View | None, node: Node | None,
                 key: Hashable | None) -> None:
        self.ino = ino
        self.lookups = 0
        self.opens = 0
        self.view = view
        self.node = node
        self.key = key
        #: virtual directories only: name → inode number
        self.children: dict[str, int] | None = None if view is not None else {}
        self.name = ""
        self.parent = ROOT_INODE
        #: (mtime_ns, size) last known to match the kernel's page cache
        self.stamp: tuple[int, int] | None = None
        #: virtual directories (and view roots mounted in them): fixed attributes
        self.attrs: Attributes | None = None
        #: the attributes last given to the kernel and when (monotonic): a listing
        #: may repeat them while younger than the cache timeout
        self.cached: Attributes | None = None
        self.cached_at = 0.0
        #: view directories: child name → inode, as last looked up or listed here
        self.kids: dict[str, int] | None = None
        #: view directories: names the kernel was told are missing (oldest first)
        self.missing: dict[str, None] | None = None
        #: a shared file's other views (``view`` is the one it answers through)
        self.sharers: list[View] | None = None
        #: the inode's key in the table (by view, or by presentation when shared)
        self.table_key: tuple | None = None

    @property
    def is_virtual(self) -> bool:
        return self.view is None


class InodeTable:
    def __init__(self) -> None:
        self._inodes: dict[int, Inode] = {}
        self._by_key: dict[tuple, int] = {}
        #: backing key → inodes of it in every view (for cross-view invalidation)
        self._by_backing: dict[Hashable, set[int]] = {}
        #: attached view roots (their key is the view's, not the backing object's)
        self._view_roots: set[int] = set()
        self._next = itertools.count(ROOT_INODE + 1)
        self._view_ids = itertools.count(1)
        now = time.time_ns()
        self.virtual_attrs = Attributes(key=None, mode=stat.S_IFDIR | 0o755, nlink=2,
                                        atime_ns=now, mtime_ns=now, ctime_ns=now)

    def __len__(self) -> int:
        return len(self._inodes)

    def __contains__(self, ino: int) -> bool:
        return ino in self._inodes

    def find_ino(self, ino: int) -> Inode | None:
        """The inode if it is still in the table (no error for a forgotten one)."""
        return self._inodes.get(ino)

    def get(self, ino: int) -> Inode:
        try:
            inode = self._inodes[ino]
        except KeyError:
            raise StaleObject(f"unknown inode {ino}") from None
        if inode.view is not None and not inode.view.alive:
            self.live_view(inode)
        return inode

    @staticmethod
    def live_view(inode: Inode) -> View:
        """A live view of a view inode: a shared file outlives the view it came from.

        Raises :class:`StaleObject` when no view that showed it is attached any more.
        """
        view = inode.view
        assert view is not None
        if view.alive:
            return view
        live = [v for v in inode.sharers or () if v.alive]
        if not live:
            raise StaleObject(f"view {view.label} was removed")
        inode.view, inode.sharers = live[0], live[1:] or None
        return live[0]

    def new_view(self, view: View) -> View:
        view.id = next(self._view_ids)
        return view

    # ---- creation --------------------------------------------------------------
    def set_root(self, view: View | None) -> Inode:
        """Inode 1: a view's root (single-vfolder mount) or a virtual directory."""
        node = view.backend.root() if view else None
        root = Inode(ROOT_INODE, view, node, None)
        root.lookups = 1  # the kernel never forgets the root
        self._inodes[ROOT_INODE] = root
        if view is not None:
            view.inodes.add(ROOT_INODE)
        else:
            root.attrs = self.virtual_attrs
        return root

    def add_virtual(self, parent: Inode, name: str) -> Inode:
        assert parent.children is not None
        inode = Inode(next(self._next), None, None, None)
        inode.attrs = self.virtual_attrs
        inode.name, inode.parent = name, parent.ino
        self._inodes[inode.ino] = inode
        parent.children[name] = inode.ino
        return inode

    def add_view_root(self, parent: Inode, name: str, view: View) -> Inode:
        """Attaches a view's root under a virtual directory."""
        assert parent.children is not None
        inode = Inode(next(self._next), view, view.backend.root(), None)
        inode.name, inode.parent = name, parent.ino
        self._inodes[inode.ino] = inode
        view.inodes.add(inode.ino)
        parent.children[name] = inode.ino
        self._view_roots.add(inode.ino)
        return inode

    def add_node(self, view: View, node: Node, attrs: Attributes) -> Inode:
        """The inode for a node just returned by the backend (deduplicated by key)."""
        share = None if stat.S_ISDIR(attrs.mode) else view.presentation
        k = (view.id, attrs.key) if share is None else ("shared", share, attrs.key)
        ino = self._by_key.get(k)
        if ino is not None:
            existing = self._inodes[ino]
            if existing.node is not node:
                view.backend.adopt(existing.node, node)
            if existing.view is not view and view not in (existing.sharers or ()):
                existing.sharers = [*(existing.sharers or ()), view]
                view.inodes.add(existing.ino)
            return existing
        inode = Inode(next(self._next), view, node, attrs.key)
        inode.table_key = k
        self._inodes[inode.ino] = inode
        self._by_key[k] = inode.ino
        self._by_backing.setdefault(attrs.key, set()).add(inode.ino)
        view.inodes.add(inode.ino)
        return inode

    def of_backend(self, backend: Backend) -> list[Inode]:
        """Every inode the kernel knows of the views of ``backend``."""
        return [i for i in self._inodes.values()
                if i.view is not None and i.view.backend is backend]

    def siblings(self, inode: Inode) -> list[int]:
        """Inodes of the same backing object in *other* views of the same backend."""
        if inode.view is None:
            return []
        if inode.key is None:  # a view root: the other views' roots of its backend
            candidates = self._view_roots if inode.ino in self._view_roots else ()
        else:
            candidates = self._by_backing.get(inode.key, ())
        out = []
        for ino in candidates:
            other = self._inodes.get(ino)
            if other is None:
                continue
            if other is not inode and other.view is not None \
                    and other.view.backend is inode.view.backend:
                out.append(ino)
        return out

    # ---- release -----------------------------------------------------------------
    def forget(self, ino: int, count: int) -> None:
        """The kernel dropped ``count`` lookups.

        Raises :class:`LookupUnderflow` when it forgets more than it was given (or
        an inode we do not know): the counts are wrong somewhere, and the caller
        must say so; the inode is dropped all the same, as the kernel wants.
        """
        if ino == ROOT_INODE:
            return
        inode = self._inodes.get(ino)
        if inode is None:
            raise LookupUnderflow(f"forget of unknown inode {ino}")
        if count > inode.lookups:
            known = inode.lookups
            inode.lookups = 0
            self._maybe_drop(inode)
            raise LookupUnderflow(f"inode {ino}: forget of {count} lookups, {known} known")
        inode.lookups -= count
        self._maybe_drop(inode)

    def drop_unreferenced(self, ino: int) -> None:
        """An inode made for a reply the kernel did not take: gone if nothing else uses it."""
        inode = self._inodes.get(ino)
        if inode is not None:
            self._maybe_drop(inode)

    def closed(self, inode: Inode) -> None:
        inode.opens -= 1
        self._maybe_drop(inode)

    def _maybe_drop(self, inode: Inode) -> None:
        if inode.lookups or inode.opens:
            return
        if inode.is_virtual:
            parent = self._inodes.get(inode.parent)
            # a virtual dir still linked in the tree stays: it may be looked up again
            if parent is not None and parent.children is not None \
                    and parent.children.get(inode.name) == inode.ino:
                return
            del self._inodes[inode.ino]
            return
        view = inode.view
        assert view is not None
        del self._inodes[inode.ino]
        self._view_roots.discard(inode.ino)
        view.inodes.discard(inode.ino)
        for other in inode.sharers or ():
            other.inodes.discard(inode.ino)
        if inode.key is not None:
            self._by_key.pop(inode.table_key, None)
            same = self._by_backing.get(inode.key)
            if same is not None:
                same.discard(inode.ino)
                if not same:
                    del self._by_backing[inode.key]
            view.backend.forget(inode.node)
        else:
            parent = self._inodes.get(inode.parent)
            if parent is not None and parent.children is not None \
                    and parent.children.get(inode.name) == inode.ino:
                # a view root still attached: keep it reachable
                self._inodes[inode.ino] = inode
                view.inodes.add(inode.ino)
                self._view_roots.add(inode.ino)

    def detach(self, parent: Inode, name: str) -> Inode | None:
        """Unlinks a child of a virtual directory; it lives on until forgotten."""
        assert parent.children is not None
        ino = parent.children.pop(name, None)
        if ino is None:
            return None
        inode = self._inodes[ino]
        self._maybe_drop(inode)
        return inode

    def view_inodes_gone(self, view: View) -> bool:
        return not view.inodes
