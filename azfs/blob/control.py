"""The control socket of an ``azfs mount`` of a blob dataset: refresh and counters.

A dataset mount caches listings (and the kernel caches entries) for the
listing TTL; ``azfs dataset refresh MOUNTPOINT`` asks the daemon to forget
them now (and the kernel to forget its entries and attributes of them),
through a unix socket next to the mount's pid file (mode 0600: root, or the
user who mounted).  One JSON request per line, one answer per
line::

    {"op": "refresh", "path": "train/class1"}   → {"ok": true, "result": {...}}
    {"op": "stats"}                             → {"ok": true, "result": {counters}}

Errors are ``{"ok": false, "message": TEXT}``; the SAS never appears.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

from azfs.errors import UserError
from azfs.sockets import bind_unix

if TYPE_CHECKING:
    from azfs.backends.base import Backend
    from azfs.fs.operations import AzfsOperations

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024


class Refreshable(Protocol):
    async def refresh(self, path: str | None = None) -> None: ...

    def stats(self) -> dict[str, object]: ...


class DatasetControl:
    """A mount's dataset as the socket drives it: a refresh reaches the kernel's caches too."""

    def __init__(self, ops: AzfsOperations, backend: Backend) -> None:
        self.ops = ops
        self.backend = backend

    async def refresh(self, path: str | None = None) -> None:
        await self.ops.refresh(self.backend, path)

    def stats(self) -> dict[str, object]:
        return self.backend.stats()


def socket_path(pidfile: Path) -> Path:
    """The control socket of the mount whose pid file is ``pidfile``."""
    return pidfile.with_suffix(".sock")


async def answer(backend: Refreshable, line: bytes) -> dict[str, Any]:
    """The answer to one request line (never raises)."""
    try:
        request = json.loads(line)
    except ValueError:
        return {"ok": False, "message": "a request must be one JSON object"}
    if not isinstance(request, dict):
        return {"ok": False, "message": "a request must be a JSON object"}
    op = request.get("op")
    if op == "refresh":
        path = request.get("path")
        if path is not None and not isinstance(path, str):
            return {"ok": False, "message": "path must be a string"}
        await backend.refresh(path or None)
        return {"ok": True, "result": {"refreshed": path or "/"}}
    if op == "stats":
        return {"ok": True, "result": backend.stats()}
    return {"ok": False, "message": f"unknown op {op!r}"}


async def serve(backend: Refreshable, path: Path) -> None:
    """Serves the socket at ``path`` until cancelled (then removes it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = trio.socket.from_stdlib_socket(bind_unix(path, backlog=16))

    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async with stream:
                while len(buf) <= MAX_LINE:
                    data = await stream.receive_some(4096)
                    if not data:
                        return
                    buf += data
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        out = await answer(backend, line)
                        await stream.send_all(json.dumps(out).encode() + b"\n")

    try:
        await trio.serve_listeners(handle, [trio.SocketListener(sock)])
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def call(path: Path, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Sends one request to the control socket at ``path`` (blocking); returns the result."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(json.dumps(request).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except FileNotFoundError:
        raise UserError("not an azfs mount of a blob dataset (no control socket)") from None
    except PermissionError:
        raise UserError("permission denied: run as the user who mounted it (or root)") \
            from None
    except OSError as exc:
        raise UserError(f"the mount daemon does not answer: {exc.strerror or exc}") from None
    try:
        out = json.loads(buf)
    except ValueError:
        raise UserError("the mount daemon gave no answer") from None
    if not out.get("ok"):
        raise UserError(str(out.get("message") or "refused"))
    return out["result"]
