"""Root-only host directories: every directory above a volume mount or the FUSE namespace.

A vfolder is reachable on a node through each directory above one of its
mounts: the raw volume, the manager's mount of it, the agent's FUSE views.
Whoever can traverse those directories can read (and, as the kernels'
presented uid, write) every user's files, so only root may: they are mode
0700 and owned by root.  Containers are unaffected -- the runtime resolves a
bind mount's source as root, and a container never sees its host parents.

:func:`ensure_private_dir` creates such a directory (and any missing parent)
as 0700, or checks one that exists: a looser mode is fixed with a warning
(or, with ``fix=False``, for a directory azfs does not own, refused); a
directory owned by another user is refused, since its owner could loosen it
again or swap what is inside.  Blocking (local disk only).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from azfs.errors import UserError

log = logging.getLogger(__name__)

PRIVATE_MODE = 0o700


class UnsafeDirectory(UserError):
    """A directory that must be root-only is not, and azfs will not fix it."""


def ensure_private_dir(path: str | os.PathLike[str], what: str, *, fix: bool = True) -> Path:
    """``path`` as a root-only directory (created 0700 if missing); returns it."""
    path = Path(os.path.abspath(path))
    missing: list[Path] = []
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, PRIVATE_MODE)
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(f"{what} {path}: cannot create {directory}: "
                            f"{exc.strerror}") from None
        os.chmod(directory, PRIVATE_MODE)  # exactly 0700, whatever the umask
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UserError(f"{what} {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"{what} {path}: not a directory")
    if st.st_uid != os.geteuid():
        raise UnsafeDirectory(
            f"{what} {path} is owned by uid {st.st_uid}, not by uid {os.geteuid()}: "
            "azfs keeps its mounts only under directories of its own user; "
            f"'chown root: {path}' or choose another directory")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        if not fix:
            raise UnsafeDirectory(
                f"{what} {path} has mode {mode:04o}: other users could reach the vfolders "
                f"mounted below it; 'chmod 0700 {path}' or choose another directory")
        log.warning("%s %s had mode %04o; changed to 0700 (only root may reach the "
                    "mounts below it)", what, path, mode)
        os.chmod(path, PRIVATE_MODE)
    return path

