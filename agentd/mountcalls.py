"""The mount system calls the agent's kernel homes need, through ctypes.

Python has no binding for ``mount(2)``'s propagation flags nor for the new
mount API (Linux >= 5.2: ``open_tree``, ``move_mount``, ``mount_setattr``),
so they are called here directly.  The new API lets a bind be made detached,
given its flags (read-only, nosuid, nodev) and only then attached: a copy
that propagates into a container is never writable, not even for a moment.
``MOVE_MOUNT_BENEATH`` (Linux >= 6.5) puts a new mount *under* the one at a
path, so that a dead bind is replaced without a moment where the path shows
the bare directory.  Every function is blocking and raises ``OSError``.
"""

from __future__ import annotations

import ctypes
import errno
import os

_libc = ctypes.CDLL(None, use_errno=True)

# syscall numbers of the new mount API: the same on every architecture (>= 424)
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOVE_MOUNT_BENEATH = 0x200
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4

MS_BIND = 4096
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(result: int, what: str, path: str | os.PathLike[str]) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", os.fspath(path))
    return result


def bind_onto_itself(path: str | os.PathLike[str]) -> None:
    """``mount --bind PATH PATH``: makes a directory a mount point of its own."""
    p = os.fsencode(path)
    _check(_libc.mount(p, p, None, MS_BIND, None), "bind", path)


def set_propagation(path: str | os.PathLike[str], shared: bool) -> None:
    """``mount --make-shared`` or ``--make-private`` of the mount at ``path`` (not recursive)."""
    flag = MS_SHARED if shared else MS_PRIVATE
    _check(_libc.mount(None, os.fsencode(path), None, flag, None), "propagation", path)


def attach_bind(source: str | os.PathLike[str], target_fd: int, *, read_only: bool,
                beneath: bool = False) -> None:
    """Binds directory ``source`` at the directory open as ``target_fd`` (an ``O_PATH``
    descriptor: no name is resolved again, so no symlink swapped in can redirect it),
    nosuid, nodev, ``ro`` if asked.

    ``beneath``: under the mount now at the target (which the caller then
    detaches) instead of on top of it.
    """
    fd = _check(_libc.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(source),
                              OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC), "open_tree", source)
    try:
        attr = _MountAttr(MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
                          | (MOUNT_ATTR_RDONLY if read_only else 0), 0, 0, 0)
        _check(_libc.syscall(SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH, ctypes.byref(attr),
                             ctypes.sizeof(attr)), "mount_setattr", source)
        flags = MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH \
            | (MOVE_MOUNT_BENEATH if beneath else 0)
        _check(_libc.syscall(SYS_MOVE_MOUNT, fd, b"", target_fd, b"", flags), "move_mount",
               f"/proc/self/fd/{target_fd}")
    finally:
        os.close(fd)


def detach(path: str | os.PathLike[str], follow: bool = False) -> bool:
    """``umount -l`` of the top mount at ``path``; False if nothing was mounted there.

    ``follow``: ``path`` is a ``/proc/self/fd/N`` link to the mount's root.
    """
    flags = MNT_DETACH | (0 if follow else UMOUNT_NOFOLLOW)
    if _libc.umount2(os.fsencode(path), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    raise OSError(err, f"umount: {os.strerror(err)}", os.fspath(path))
