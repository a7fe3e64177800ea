"""Resolving a vfolder path inside a mounted host volume without leaving it.

A vfolder path comes from the manager (``<uuid-hex>`` or a few components)
and names a directory *inside* the volume's mount.  Every component is
opened relative to its parent's descriptor with ``O_NOFOLLOW``, so a
symlink anywhere on the way (even one pointing back inside the volume) and
a concurrent rename cannot make the agent hand out a directory outside the
volume.  Blocking: call from trio through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from azfs.usage import META_DIR

_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC


class PathOutsideVolume(ValueError):
    """The path leaves the volume (``..``, absolute, or a symlink on the way)."""


class PathMissing(FileNotFoundError):
    """A component of the path does not exist or is not a directory."""


def split_relative(rel: str) -> list[str]:
    parts = [p for p in rel.split("/") if p]
    if not parts or rel.startswith("/") or "\0" in rel or any(p in (".", "..") for p in parts):
        raise PathOutsideVolume(f"{rel!r} is not a relative path inside the volume")
    if META_DIR in parts:
        # a vfolder's usage ledger is the filesystem's, never a kernel's to edit
        raise PathOutsideVolume(f"{rel!r} names the reserved directory {META_DIR}")
    return parts


def open_beneath(root: str | os.PathLike[str], rel: str) -> int:
    """An ``O_PATH`` descriptor of directory ``root/rel``, reached without symlinks.

    ``root`` itself is trusted (the agent's own mount point).  The caller
    closes the descriptor.
    """
    parts = split_relative(rel)
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            try:
                nfd = os.open(part, _FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    raise PathMissing(f"{rel}: {part!r} does not exist in the volume") from None
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    if _is_symlink(fd, part):
                        raise PathOutsideVolume(
                            f"{rel}: {part!r} is a symlink; vfolder paths may not "
                            "contain symlinks") from None
                    raise PathMissing(f"{rel}: {part!r} is not a directory") from None
                raise
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_symlink(dir_fd: int, name: str) -> bool:
    try:
        import stat

        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def check_beneath(root: str | os.PathLike[str], rel: str) -> Path:
    """Validates ``root/rel`` as :func:`open_beneath` does; returns the plain path."""
    os.close(open_beneath(root, rel))
    return Path(root, *split_relative(rel))
