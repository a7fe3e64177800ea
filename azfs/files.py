"""Replacing a small file atomically: readers and crashes see the old or the new content.

The one write-then-rename of azfs for state and config files (journal,
volume config and its cache, node settings, tokens): the content goes to a
temporary file in the same directory, created 0600 and set to ``mode``
before any byte is written (a secret is never readable by others, not even
briefly), is fsynced, renamed over ``path``, and the directory is fsynced so
that the rename itself survives a crash.  A failed write removes the
temporary file and leaves ``path`` as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def atomic_write(path: str | Path, data: str | bytes, mode: int = 0o600) -> None:
    """Replaces ``path`` with ``data`` (text is UTF-8), the new file having exactly ``mode``."""
    path = Path(path)
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(data.encode() if isinstance(data, str) else data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(directory)


def fsync_directory(directory: str | Path) -> None:
    """Makes the entries of ``directory`` (a rename, a new file) durable."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
