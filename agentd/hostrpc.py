"""The fusehost's control API: JSON lines over a private unix socket.

One request object per line, one answer object per line::

    attach  path=[...] view={label, read_only, uid, gid} backend={...} digest=STR
    detach  path=[...]
    refresh path=[...]      (a blob dataset's view: list the container again now)
    list
    stats
    health

``backend`` is ``{"kind": "posix", "volume_root", "path", "quota_bytes",
"quota_files"}`` (the vfolder directory is opened beneath the volume root
without following symlinks, see :mod:`agentd.paths`) or ``{"kind": "blob",
"url", "sas"?, "sas_url"?}``.  Answers are ``{"ok": true, "result": ...}``
or ``{"ok": false, "code": CODE, "message": TEXT}``: ``invalid`` for a
request that is not of this form (every field's type is checked before
anything runs), ``internal`` (logged with its traceback) for a fault of
this process.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import trio

from agentd.views import FuseHost, HostError, check_path
from azfs.secret import redact
from azfs.sockets import bind_unix

log = logging.getLogger("agentd.fusehost")

MAX_LINE = 1024 * 1024


class ControlServer:
    """Answers the agent's requests for one :class:`~agentd.views.FuseHost`."""

    def __init__(self, host: FuseHost) -> None:
        self.host = host

    async def serve(self, socket_path: Path,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.from_stdlib_socket(bind_unix(socket_path))
        task_status.started()
        await trio.serve_listeners(self._handle, [trio.SocketListener(sock)])

    async def _handle(self, stream: trio.SocketStream) -> None:
        buf = b""
        try:
            async with stream:
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        answer = await self._dispatch(line)
                        await stream.send_all(json.dumps(answer).encode() + b"\n")
                    if len(buf) > MAX_LINE:
                        await stream.send_all(json.dumps(
                            {"ok": False, "code": "invalid",
                             "message": "request too large"}).encode() + b"\n")
                        return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    async def _dispatch(self, line: bytes) -> dict:
        try:
            try:
                request = json.loads(line)
            except ValueError as exc:  # bad JSON or bad UTF-8
                raise HostError("invalid", f"a request must be one JSON object: {exc}") \
                    from None
            if not isinstance(request, dict):
                raise HostError("invalid", "a request must be a JSON object")
            op = request.get("op")
            _check_request(op, request)
            if op == "attach":
                result = await self.host.attach(request["path"], request.get("view") or {},
                                           request["backend"],
                                           str(request.get("digest") or ""))
            elif op == "detach":
                result = await self.host.detach(request["path"])
            elif op == "refresh":
                result = await self.host.refresh(request.get("path"))
            elif op == "list":
                result = self.host.list()
            elif op == "stats":
                result = self.host.stats()
            elif op == "health":
                result = self.host.health()
            else:
                raise HostError("invalid", f"unknown op {op!r}")
            return {"ok": True, "result": result}
        except HostError as exc:
            return {"ok": False, "code": exc.code, "message": redact(str(exc))}
        except Exception as exc:  # noqa: BLE001 - the socket must outlive any request
            # input was validated above: anything else is a fault of this process
            log.exception("request failed")
            return {"ok": False, "code": "internal", "message": redact(str(exc))}


#: the fields each backend kind reads, with their JSON types (None is always allowed)
_BACKEND_FIELDS: dict[str, dict[str, type]] = {
    "posix": {"volume_root": str, "path": str, "quota_bytes": int, "quota_files": int},
    "blob": {"url": str, "sas": str, "sas_url": str},
}
_VIEW_FIELDS: dict[str, type] = {"label": str, "read_only": bool, "uid": int, "gid": int}


def _check_request(op: object, request: dict) -> None:
    """Checks the type of every field ``op`` reads, so that only bad input is ``invalid``."""
    if op not in ("attach", "detach"):
        return
    check_path(request.get("path"))
    if op == "detach":
        return
    _check_fields(request, {"digest": str}, "")
    view = request.get("view")
    if view is not None:
        _check_fields(_object(view, "view"), _VIEW_FIELDS, "view.")
    backend = _object(request.get("backend"), "backend")
    kind = backend.get("kind")
    fields = _BACKEND_FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise HostError("invalid", f"unknown backend kind {kind!r}")
    _check_fields(backend, fields, "backend.")


def _object(value: object, name: str) -> dict:
    if not isinstance(value, dict):
        raise HostError("invalid", f"{name} must be a JSON object")
    return value


def _check_fields(obj: dict, fields: dict[str, type], prefix: str) -> None:
    for name, kind in fields.items():
        value = obj.get(name)
        if value is None:
            continue
        # JSON true/false are bools, and bool is an int in Python: keep them apart
        if kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        else:
            ok = isinstance(value, kind)
        if not ok:
            what = {str: "a string", bool: "true or false",
                    int: "a non-negative integer"}[kind]
            raise HostError("invalid", f"{prefix}{name} must be {what}")
