"""Unix sockets that appear at their path only when ready: right mode, right group.

A daemon's control socket is bound under a temporary name next to its path
(with a umask that leaves it 0600), given its final group and mode, and
renamed over ``path``: no client ever sees it too open, and a socket left
by an earlier run is replaced in one step instead of unlinked first.
Binding a unix socket does not block, so trio code binds with this too and
wraps the result with ``trio.socket.from_stdlib_socket``.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path


def bind_unix(path: str | Path, mode: int = 0o600, gid: int | None = None,
              backlog: int = 128) -> socket.socket:
    """A stream socket listening at ``path`` with ``mode`` (and group ``gid``).

    It listens before it appears at ``path``: a client that waits for the path
    (the agent starting its fusehost) never connects to a socket that refuses.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(str(tmp))
        finally:
            os.umask(old)
        if gid is not None:
            os.chown(tmp, -1, gid)
        os.chmod(tmp, mode)
        sock.listen(backlog)
        os.replace(tmp, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return sock
