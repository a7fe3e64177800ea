"""Node handles of the posix backend and the budget of descriptors they hold.

A node is pinned to one backing inode by an ``O_PATH | O_NOFOLLOW``
descriptor.  The kernel may remember more inodes than the process may hold
descriptors (a walk of a big tree), so descriptors live in a process-wide LRU
bounded by ``RLIMIT_NOFILE``: an evicted node keeps its parent node and
name, and is reopened on demand one component at a time relative to its
parent (still ``O_NOFOLLOW``, still inside the vfolder).  A reopened name
that now designates another inode (changed on the volume behind our back)
gives :class:`~azfs.errors.StaleObject`, never the wrong file.

Names are kept up to date by the backend's own ``rename``/``unlink``; a node
whose name is gone (unlinked while known) is never evicted, since it could
not be reopened.
"""

from __future__ import annotations

import errno
import os
import resource
import weakref
from collections import OrderedDict

from azfs.backends.base import Node
from azfs.errors import StaleObject

PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
#: descriptors left for open files, directories being listed, sockets, logs
_RESERVE_MIN = 256
_EVICT_BATCH = 64


class PosixNode(Node):
    __slots__ = ("fd", "mode", "key", "parent", "name", "touched", "__weakref__")

    def __init__(self, fd: int, mode: int, key: tuple[int, int],
                 parent: PosixNode | None, name: str | None) -> None:
        self.fd = fd
        self.mode = mode
        self.key = key
        self.parent = parent
        self.name = name
        self.touched = 0

    @property
    def reopenable(self) -> bool:
        return self.parent is not None and self.name is not None


class DescriptorPool:
    """LRU of nodes holding a descriptor, bounded by the process's file limit."""

    def __init__(self) -> None:
        self._nodes: OrderedDict[int, PosixNode] = OrderedDict()
        #: bumped at the start of every backend operation; descriptors touched in
        #: the current operation are never closed under it
        self.epoch = 1

    def begin(self) -> None:
        self.epoch += 1

    def budget(self) -> int:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 20
        return max(16, soft - max(_RESERVE_MIN, soft // 4))

    def __len__(self) -> int:
        return len(self._nodes)

    def admit(self, node: PosixNode) -> None:
        node.touched = self.epoch
        self._nodes[id(node)] = node
        budget = self.budget()
        if len(self._nodes) > budget:
            # evict a batch at once: the budget check then passes for a while
            self.evict(len(self._nodes) - budget + max(1, budget // 16))

    def touch(self, node: PosixNode) -> None:
        node.touched = self.epoch
        key = id(node)
        if key in self._nodes:
            self._nodes.move_to_end(key)

    def discard(self, node: PosixNode) -> None:
        self._nodes.pop(id(node), None)

    def evict(self, count: int = _EVICT_BATCH) -> int:
        """Closes the descriptors of up to ``count`` least recently used reopenable nodes.

        Walks from the old end and stops as soon as enough were closed: nodes
        that cannot go now (in use by this operation, or not reopenable) are
        rotated to the new end, so each is looked at most once per call.
        """
        closed = 0
        for _ in range(len(self._nodes)):
            if closed >= count or not self._nodes:
                break
            key, node = next(iter(self._nodes.items()))
            if not node.reopenable or node.touched == self.epoch:
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


class NodeNames:
    """Which node is known under (parent, name), so renames and unlinks update nodes."""

    def __init__(self) -> None:
        self._by_name: weakref.WeakValueDictionary[tuple[int, str], PosixNode] = \
            weakref.WeakValueDictionary()

    def add(self, node: PosixNode) -> None:
        if node.parent is not None and node.name is not None:
            self._by_name[(id(node.parent), node.name)] = node

    def get(self, parent: PosixNode, name: str) -> PosixNode | None:
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
        descriptor, if the known one was evicted).
        """
        if existing.parent is not None and existing.name is not None:
            key = (id(existing.parent), existing.name)
            if self._by_name.get(key) is existing:
                del self._by_name[key]
        existing.parent, existing.name = new.parent, new.name
        if existing.fd < 0 and new.fd >= 0:
            pool.discard(new)
            existing.fd, new.fd = new.fd, -1
            pool.admit(existing)
        else:
            release(new)
        self.add(existing)

    def removed(self, parent: PosixNode, name: str) -> None:
        """The name is gone: its node can no longer be reopened (keep its descriptor)."""
        node = self.get(parent, name)
        if node is not None:
            del self._by_name[(id(parent), name)]
            node.name = None
            pool.discard(node)  # never evicted from now on

    def moved(self, old_parent: PosixNode, old_name: str, new_parent: PosixNode,
              new_name: str, exchange: bool) -> None:
        src = self.get(old_parent, old_name)
        dst = self.get(new_parent, new_name)
        if src is not None:
            del self._by_name[(id(old_parent), old_name)]
        if dst is not None:
            del self._by_name[(id(new_parent), new_name)]
            if exchange:
                dst.parent, dst.name = old_parent, old_name
                self.add(dst)
            else:
                dst.name = None
                pool.discard(dst)
        if src is not None:
            src.parent, src.name = new_parent, new_name
            self.add(src)


def node_fd(node: PosixNode) -> int:
    """The node's descriptor, reopened by name if it was evicted."""
    if node.fd >= 0:
        pool.touch(node)
        return node.fd
    if node.parent is None or node.name is None:
        raise StaleObject("the object is gone")
    parent_fd = node_fd(node.parent)
    fd = open_at(node.name, parent_fd)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != node.key:
        os.close(fd)
        raise StaleObject(f"{node.name!r} was replaced on the volume")
    node.fd = fd
    pool.admit(node)
    return fd


def release(node: PosixNode) -> None:
    pool.discard(node)
    if node.fd >= 0:
        os.close(node.fd)
        node.fd = -1
