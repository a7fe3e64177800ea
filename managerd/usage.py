"""A vfolder's usage (bytes, files) from the filesystem's incremental ledger.

The ledger (``azfs.usage``) is kept by the FUSE daemon inside the vfolder
directory, so the manager reads it on its own mount of the volume without
walking the tree.  A number that cannot be known raises
:class:`UsageUnavailable` — never ``-1``.
"""

from __future__ import annotations

from pathlib import Path

from azfs.volumes.hostmount import STALE_ERRNOS
from managerd.errors import Unavailable


class UsageUnavailable(Unavailable):
    code = "usage-unavailable"


def read_usage(vfolder_dir: Path) -> tuple[int, int]:
    """(bytes, files) of the vfolder at ``vfolder_dir``; blocking (call it in a thread)."""
    try:
        from azfs.usage import read_usage as read_ledger
    except ImportError:
        raise UsageUnavailable("usage accounting is not available in this build") from None
    try:
        used_bytes, files, _clean = read_ledger(vfolder_dir)
    except LookupError:
        raise UsageUnavailable("the vfolder has no usage ledger yet "
                               "(it was not created through azfs)") from None
    except FileNotFoundError:
        raise UsageUnavailable("the vfolder directory is missing on its volume") from None
    except OSError as exc:
        if exc.errno in STALE_ERRNOS:
            raise  # a dead mount: the caller remounts and asks again
        raise UsageUnavailable(f"cannot read usage: {exc.strerror or exc}") from None
    if used_bytes < 0 or files < 0:
        raise UsageUnavailable("the usage ledger holds negative numbers")
    return used_bytes, files


def init_usage(vfolder_dir: Path) -> None:
    """Writes the ledger of a new, empty vfolder (0 bytes, 0 files)."""
    try:
        from azfs.usage import init_ledger
    except ImportError:
        return
    init_ledger(vfolder_dir)
