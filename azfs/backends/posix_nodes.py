"""Node handles of the posix backend and the budget of descriptors they hold.

A node is pinned to one backing inode by an ``O_PATH | O_NOFOLLOW``
descriptor.  The kernel may remember more inodes than the process may hold
descriptors (a walk of a big tree), so descriptors live in a process-wide LRU
bounded by ``RLIMIT_NOFILE``: an evicted node keeps its parent node and
name, and is reopened on demand one component at a time relative to its
parent (still ``O_NOFOLLOW``, still inside the vfolder).  A reopened name
that now designates another inode (changed on the volume behind our back)
gives :class:`~azfs.errors.StaleObject`, never the wrong file.  A node may
also start without a descriptor (listed by readdirplus, never opened): it is
opened the same way when first used.

Calls run in worker threads of their volume (:mod:`azfs.volumes.io`), so a
descriptor is used only while *held* (:func:`held`): eviction and forget never
close a held descriptor, which could otherwise be reused by another thread's
``open`` and make a call touch the wrong file.  The pool's lock is taken for
bookkeeping only, never across a call to a volume (closing an ``O_PATH``
descriptor does not reach the filesystem).

Names are kept up to date by the backend's own ``rename``/``unlink``; a node
whose name is gone (unlinked while known) is never evicted, since it could
not be reopened.
"""

from __future__ import annotations

import errno
import os
import resource
import threading
from collections import OrderedDict

from azfs.backends.base import Node
from azfs.errors import StaleObject

PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
#: descriptors left for open files, directories being listed, sockets, logs
_RESERVE_MIN = 256
_EVICT_BATCH = 64


class PosixNode(Node):
    __slots__ = ("fd", "mode", "key", "parent", "name", "users", "forgotten")

    def __init__(self, fd: int, mode: int, key: tuple[int, int],
                 parent: PosixNode | None, name: str | None) -> None:
        self.fd = fd
        self.mode = mode
        self.key = key
        self.parent = parent
        self.name = name
        #: calls holding the descriptor right now
        self.users = 0
        #: released by the FUSE layer: the descriptor goes when the last user lets go
        self.forgotten = False

    @property
    def reopenable(self) -> bool:
        return self.parent is not None and self.name is not None


class DescriptorPool:
    """LRU of nodes holding a descriptor, bounded by the process's file limit."""

    def __init__(self) -> None:
        self._nodes: OrderedDict[int, PosixNode] = OrderedDict()
        self.lock = threading.Lock()
        self._budget: int | None = None

    def budget(self) -> int:
        """Read at first use: the daemon raises its file limit before it serves."""
        if self._budget is None:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            if soft == resource.RLIM_INFINITY:
                soft = 1 << 20
            self._budget = max(16, soft - max(_RESERVE_MIN, soft // 4))
        return self._budget

    def __len__(self) -> int:
        return len(self._nodes)

    def admit(self, node: PosixNode) -> None:
        with self.lock:
            self._nodes[id(node)] = node
            self._trim_locked()

    def _trim_locked(self) -> None:
        budget = self.budget()
        over = len(self._nodes) - budget
        if over > 0:
            # evict a batch at once: the budget check then passes for a while
            self._evict_locked(over + max(1, budget // 16))

    def discard(self, node: PosixNode) -> None:
        with self.lock:
            self._nodes.pop(id(node), None)

    def evict(self, count: int = _EVICT_BATCH) -> int:
        """Closes the descriptors of up to ``count`` least recently used idle nodes."""
        with self.lock:
            return self._evict_locked(count)

    def _evict_locked(self, count: int) -> int:
        """Walks from the old end and stops as soon as enough were closed.

        Nodes that cannot go now (held by a call, or not reopenable) are rotated
        to the new end, so each is looked at most once per call.
        """
        closed = 0
        for _ in range(len(self._nodes)):
            if closed >= count or not self._nodes:
                break
            key, node = next(iter(self._nodes.items()))
            if not node.reopenable or node.users:
                self._nodes.move_to_end(key)
                continue
            del self._nodes[key]
            if node.fd >= 0:
                os.close(node.fd)
                node.fd = -1
            closed += 1
        return closed


#: one pool per process: the descriptor limit is the process's
pool = DescriptorPool()


def open_at(name: str | bytes, dir_fd: int, flags: int = PATH_FLAGS, mode: int = 0o777) -> int:
    """``openat`` that makes room in the pool and retries once on EMFILE."""
    try:
        return os.open(name, flags, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE) or not pool.evict():
            raise
    return os.open(name, flags, mode, dir_fd=dir_fd)


def open_stat(parent: PosixNode, name: str) -> tuple[int, os.stat_result]:
    """An ``O_PATH`` descriptor of ``name`` in ``parent`` (no symlink followed), and
    the attributes of what it designates."""
    with held(parent) as parent_fd:
        fd = open_at(name, parent_fd)
    try:
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def _acquire(node: PosixNode) -> int:
    """Holds the node's descriptor (reopened by name if it has none); see :func:`held`."""
    with pool.lock:
        if node.fd >= 0:
            node.users += 1
            if id(node) in pool._nodes:
                pool._nodes.move_to_end(id(node))
            return node.fd
        parent, name = node.parent, node.name
    if parent is None or name is None:
        raise StaleObject("the object is gone")
    fd, st = open_stat(parent, name)
    if (st.st_dev, st.st_ino) != node.key:
        os.close(fd)
        raise StaleObject(f"{name!r} was replaced on the volume")
    with pool.lock:
        node.users += 1
        if node.fd >= 0:  # another call reopened it meanwhile
            os.close(fd)
            return node.fd
        node.fd = fd
        if node.reopenable and not node.forgotten:
            pool._nodes[id(node)] = node
            pool._trim_locked()
        return fd


def _let_go(node: PosixNode) -> None:
    with pool.lock:
        node.users -= 1
        if node.users == 0 and node.forgotten and node.fd >= 0:
            os.close(node.fd)
            node.fd = -1


class held:
    """``with held(node) as fd``: the node's descriptor, never closed while held.

    A class rather than a generator: it runs for every call (the cheaper, the
    better for a local volume).
    """

    __slots__ = ("node",)

    def __init__(self, node: PosixNode) -> None:
        self.node = node

    def __enter__(self) -> int:
        return _acquire(self.node)

    def __exit__(self, *exc: object) -> None:
        _let_go(self.node)


def node_fd(node: PosixNode) -> int:
    """The node's descriptor without holding it: for nodes nothing can close (a root)."""
    with held(node) as fd:
        return fd


def release(node: PosixNode) -> None:
    """The FUSE layer forgot the node: close its descriptor (once nobody holds it)."""
    with pool.lock:
        pool._nodes.pop(id(node), None)
        node.forgotten = True
        if node.users == 0 and node.fd >= 0:
            os.close(node.fd)
            node.fd = -1


class NodeNames:
    """Which node is known under (parent, name), so renames and unlinks update nodes.

    A plain map (cheaper than weak references for every listed entry): a node
    leaves it when it is released (:meth:`discard`) or its name goes.  Several
    worker threads update it: every change of the map and of a node's
    (parent, name) happens under one lock, never across a call to the volume.
    """

    def __init__(self) -> None:
        self._by_name: dict[tuple[int, str], PosixNode] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._by_name)

    def add(self, node: PosixNode) -> None:
        if node.parent is not None and node.name is not None:
            with self._lock:
                self._by_name[(id(node.parent), node.name)] = node

    def discard(self, node: PosixNode) -> None:
        """The node is released: forget its name (if the name is still its own)."""
        if node.parent is None or node.name is None:
            return
        key = (id(node.parent), node.name)
        with self._lock:
            if self._by_name.get(key) is node:
                del self._by_name[key]

    def get(self, parent: PosixNode, name: str) -> PosixNode | None:
        with self._lock:
            return self._get_locked(parent, name)

    def _get_locked(self, parent: PosixNode, name: str) -> PosixNode | None:
        node = self._by_name.get((id(parent), name))
        return node if node is not None and node.parent is parent else None

    def pin(self, parent: PosixNode, name: str) -> None:
        """Before a name goes: give its node a descriptor, the only way to it afterwards."""
        node = self.get(parent, name)
        if node is not None and node.fd < 0:
            try:
                node_fd(node)
            except (OSError, StaleObject):
                pass

    def adopt(self, existing: PosixNode, new: PosixNode) -> None:
        """A fresh lookup found a known object under a name: keep the known node, current.

        The object may have been renamed or unlinked on the volume behind our back;
        the new lookup's name is valid now, so the known node takes it (and its
        descriptor, if the known one has none).
        """
        with self._lock:
            if existing.parent is not None and existing.name is not None:
                key = (id(existing.parent), existing.name)
                if self._by_name.get(key) is existing:
                    del self._by_name[key]
            existing.parent, existing.name = new.parent, new.name
            if existing.parent is not None and existing.name is not None:
                self._by_name[(id(existing.parent), existing.name)] = existing
        take = False
        with pool.lock:
            if existing.fd < 0 and new.fd >= 0 and new.users == 0:
                pool._nodes.pop(id(new), None)
                existing.fd, new.fd = new.fd, -1
                take = True
        if take:
            pool.admit(existing)
        release(new)

    def removed(self, parent: PosixNode, name: str) -> None:
        """The name is gone: its node can no longer be reopened (keep its descriptor)."""
        with self._lock:
            node = self._get_locked(parent, name)
            if node is None:
                return
            del self._by_name[(id(parent), name)]
            node.name = None
        pool.discard(node)  # never evicted from now on

    def moved(self, old_parent: PosixNode, old_name: str, new_parent: PosixNode,
              new_name: str, exchange: bool) -> None:
        gone = None
        with self._lock:
            src = self._get_locked(old_parent, old_name)
            dst = self._get_locked(new_parent, new_name)
            if src is not None:
                del self._by_name[(id(old_parent), old_name)]
            if dst is not None:
                del self._by_name[(id(new_parent), new_name)]
                if exchange:
                    dst.parent, dst.name = old_parent, old_name
                    self._by_name[(id(old_parent), old_name)] = dst
                else:
                    dst.name = None
                    gone = dst
            if src is not None:
                src.parent, src.name = new_parent, new_name
                self._by_name[(id(new_parent), new_name)] = src
        if gone is not None:
            pool.discard(gone)
