"""The node's FUSE process: one namespace mount, changed at run time over a private socket.

``python -m agentd.fusehost --mountpoint M --socket S`` mounts an empty
namespace (:class:`~azfs.fs.operations.AzfsOperations` without a root view)
and serves a JSON-lines API on the unix socket ``S`` (mode 0600): one
request object per line, one answer object per line.

Requests (``op`` plus arguments)::

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
or ``{"ok": false, "code": CODE, "message": TEXT}``.

Invariants: views of the same vfolder directory (or the same blob source)
share one backend, so one usage ledger counts for all kernels; a backend is
started before its first view and closed after its last one is detached.
``attach`` of a path that exists with the same ``digest`` succeeds without
change (the agent replays its journal after a restart); with another digest
it is refused with ``exists``.  The process is started by agentd in a
session of its own, so that agentd can die or be upgraded while containers
keep using this mount; SIGTERM unmounts and exits.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from agentd.paths import PathMissing, PathOutsideVolume, open_beneath
from azfs.backends.base import Backend
from azfs.errors import AzfsError
from azfs.fs.inodes import View
from azfs.fs.operations import AzfsOperations
from azfs.logs import setup_logging
from azfs.secret import Secret, redact
from azfs.usage import Quota
from azfs.volumes.io import IOLimits, Kind, VolumeIO

log = logging.getLogger("agentd.fusehost")

MAX_LINE = 1024 * 1024
SAS_FETCH_TIMEOUT = 30.0


class HostError(Exception):
    """A refused request; ``code`` is stable, the message safe to show."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Shared:
    """One backend and the attached paths that use it."""

    key: tuple
    backend: Backend
    users: set[tuple[str, ...]] = field(default_factory=set)


@dataclass
class _Attached:
    path: tuple[str, ...]
    view: View
    shared: _Shared
    digest: str
    kind: str


class FuseHost:
    """The namespace of attached views and the backends behind them."""

    def __init__(self, ops: AzfsOperations, mountpoint: Path, cache_dir: Path | None = None,
                 cache_bytes: int = 0, limits: IOLimits | None = None) -> None:
        self.ops = ops
        self.mountpoint = mountpoint
        #: every host volume's own worker threads, deadlines and health, by its root
        self.limits = limits or IOLimits()
        self._volumes: dict[str, VolumeIO] = {}
        self.cache_dir = cache_dir
        self.cache_bytes = cache_bytes
        self.cache = None
        self.started = time.time()
        self._attached: dict[tuple[str, ...], _Attached] = {}
        self._backends: dict[tuple, _Shared] = {}
        self._key_locks: dict[tuple, trio.Lock] = {}
        self._path_locks: dict[tuple[str, ...], trio.Lock] = {}

    # ---- commands ------------------------------------------------------------------
    async def attach(self, path: Sequence[str], view: dict, backend: dict,
                     digest: str) -> dict:
        key_path = _check_path(path)
        try:
            return await self._attach(key_path, view, backend, digest)
        finally:
            self._prune_lock(key_path)

    async def _attach(self, key_path: tuple[str, ...], view: dict, backend: dict,
                      digest: str) -> dict:
        async with self._path_lock(key_path):
            existing = self._attached.get(key_path)
            if existing is not None:
                if existing.digest == digest:
                    return {"path": list(key_path), "created": False}
                raise HostError("exists", f"{'/'.join(key_path)} is attached with another "
                                          "configuration")
            shared = await self._backend_for(backend)
            try:
                v = View(label=str(view.get("label") or "/".join(key_path)),
                         backend=shared.backend, read_only=bool(view.get("read_only")),
                         uid=view.get("uid"), gid=view.get("gid"),
                         # a dataset's names and sizes hold for its listing TTL
                         cache_timeout=shared.backend.cache_timeout)
                try:
                    self.ops.attach(key_path, v)
                except FileExistsError as exc:
                    raise HostError("exists", str(exc)) from None
                except ValueError as exc:
                    raise HostError("invalid", str(exc)) from None
            except BaseException:
                await self._drop_user(shared, None)
                raise
            shared.users.add(key_path)
            self._attached[key_path] = _Attached(key_path, v, shared, digest,
                                                 str(backend.get("kind")))
            log.info("attached %s (%s%s)", "/".join(key_path), backend.get("kind"),
                     ", ro" if v.read_only else "")
            return {"path": list(key_path), "created": True}

    async def detach(self, path: Sequence[str]) -> dict:
        key_path = _check_path(path)
        try:
            async with self._path_lock(key_path):
                entry = self._attached.pop(key_path, None)
                if entry is None:
                    return {"path": list(key_path), "removed": False}
                self.ops.detach(key_path)
                await self._drop_user(entry.shared, key_path)
                self._forget_label(entry.view.label)
                log.info("detached %s", "/".join(key_path))
                return {"path": list(key_path), "removed": True}
        finally:
            self._prune_lock(key_path)

    def refresh(self, path: Sequence[str]) -> dict:
        """Forgets the cached listings of the dataset attached at ``path``."""
        key_path = _check_path(path)
        entry = self._attached.get(key_path)
        if entry is None:
            raise HostError("not-found", f"{'/'.join(key_path)} is not attached")
        refresh = getattr(entry.shared.backend, "refresh", None)
        if not callable(refresh):
            raise HostError("invalid", f"{'/'.join(key_path)} is not a blob dataset")
        refresh()
        return {"path": list(key_path), "refreshed": True}

    def _forget_label(self, label: str) -> None:
        """Drops the byte counters of a vfolder no view shows any more (bounded metrics)."""
        if any(a.view.label == label for a in self._attached.values()):
            return
        self.ops.stats.bytes_read.pop(label, None)
        self.ops.stats.bytes_written.pop(label, None)

    def _prune_lock(self, path: tuple[str, ...]) -> None:
        lock = self._path_locks.get(path)
        if lock is not None and not lock.locked() and not lock.statistics().tasks_waiting:
            del self._path_locks[path]

    def list(self) -> dict:
        return {"views": [{"path": list(a.path), "digest": a.digest, "label": a.view.label,
                           "kind": a.kind, "read_only": a.view.read_only}
                          for a in sorted(self._attached.values(), key=lambda a: a.path)],
                "backends": len(self._backends)}

    def stats(self) -> dict:
        out: dict[str, Any] = {"fs": self.ops.stats.snapshot(), "usage": {}, "blob": {},
                               "volumes": self.volumes(), "table": self._bookkeeping()}
        for shared in self._backends.values():
            labels = sorted({self._attached[p].view.label for p in shared.users
                             if p in self._attached})
            label = labels[0] if labels else repr(shared.key)
            ledger = getattr(shared.backend, "ledger", None)
            if ledger is not None:
                out["usage"][label] = {"bytes": ledger.bytes, "files": ledger.files,
                                       "quota_bytes": ledger.quota.bytes,
                                       "quota_files": ledger.quota.files}
            backend_stats = getattr(shared.backend, "stats", None)
            if callable(backend_stats):
                out["blob"][label] = backend_stats()
        if self.cache is not None:
            c = self.cache.stats()
            out["cache"] = {"hits": c.hits, "misses": c.misses, "bytes": c.bytes,
                            "entries": c.entries, "max_bytes": c.max_bytes,
                            "evictions": c.evictions}
        return out

    def _bookkeeping(self) -> dict[str, int]:
        from azfs.backends.posix_nodes import pool

        # descriptors held for inodes the kernel knows (open files have their own)
        return {**self.ops.bookkeeping(), "descriptors": len(pool)}

    def health(self) -> dict:
        return {"pid": os.getpid(), "mountpoint": str(self.mountpoint),
                "views": len(self._attached), "backends": len(self._backends),
                "volumes": self.volumes(),
                "started": self.started,
                "cache_dir": str(self.cache_dir) if self.cache_dir else None,
                "cache_bytes": self.cache_bytes,
                "datasets": self.dataset_counters()}

    def dataset_counters(self) -> dict[str, dict[str, Any]]:
        """Per blob dataset: data GETs, HEADs, listing pages, blocks served by the cache."""
        out: dict[str, dict[str, Any]] = {}
        for label, s in self.stats_of_blobs().items():
            out[label] = {k: s.get(f"http.{k}", 0) for k in ("data_gets", "heads", "lists")}
            out[label]["cache_hits"] = s.get("read.cache_hits", 0)
            out[label]["bytes"] = s.get("http.bytes", 0)
        return out

    def stats_of_blobs(self) -> dict[str, dict[str, Any]]:
        return {label: s for label, s in self.stats()["blob"].items()
                if "http.data_gets" in s}

    # ---- backends --------------------------------------------------------------------
    def _path_lock(self, path: tuple[str, ...]) -> trio.Lock:
        return self._path_locks.setdefault(path, trio.Lock())

    async def _backend_for(self, spec: dict) -> _Shared:
        kind = spec.get("kind")
        if kind == "posix":
            return await self._posix(spec)
        if kind == "blob":
            return await self._blob(spec)
        raise HostError("invalid", f"unknown backend kind {kind!r}")

    async def _posix(self, spec: dict) -> _Shared:
        from azfs.backends.posix import PosixBackend

        root, rel = str(spec.get("volume_root") or ""), str(spec.get("path") or "")
        quota = Quota(int(spec.get("quota_bytes") or 0), int(spec.get("quota_files") or 0))
        if not os.path.isabs(root):
            raise HostError("invalid", "volume_root must be an absolute path")
        io = self._volume_io(root)
        try:
            fd, st = await io.run(Kind.METADATA, _open_vfolder, root, rel, blocking=True,
                                  cleanup=lambda result: os.close(result[0]))
        except PathOutsideVolume as exc:
            raise HostError("path-outside-volume", str(exc)) from None
        except PathMissing as exc:
            raise HostError("vfolder-not-found", str(exc)) from None
        except OSError as exc:
            raise HostError("unavailable", f"{rel}: {exc.strerror}") from None
        except AzfsError as exc:  # the volume is degraded or did not answer in time
            raise HostError("unavailable", f"{rel}: {exc}") from None
        try:
            key = ("posix", st.st_dev, st.st_ino)
            async with self._key_locks.setdefault(key, trio.Lock()):
                shared = self._backends.get(key)
                if shared is not None:
                    shared.backend.ledger.quota = quota  # type: ignore[attr-defined]
                    return shared
                # /proc/self/fd/N names exactly the directory reached without symlinks
                backend = PosixBackend(f"/proc/self/fd/{fd}", quota=quota, io=io)
                backend.source = Path(root, rel)
                await self._start(backend)
                shared = self._backends[key] = _Shared(key, backend)
                return shared
        finally:
            os.close(fd)

    def _volume_io(self, root: str) -> VolumeIO:
        io = self._volumes.get(root)
        if io is None:
            io = self._volumes[root] = VolumeIO.for_path(Path(root).name or root, root,
                                                        self.limits)
        return io

    def volumes(self) -> dict[str, dict[str, Any]]:
        """Each host volume's state, calls in flight, timeouts and latency (by its name)."""
        out = {}
        for root, io in sorted(self._volumes.items()):
            entry = io.stats()
            entry["root"] = root
            entry["vfolders"] = sum(1 for s in self._backends.values()
                                    if getattr(s.backend, "io", None) is io)
            out[io.name] = entry
        return out

    async def _blob(self, spec: dict) -> _Shared:
        from azfs.backends.blob import BlobBackend
        from azfs.blob.sas import static_token_source, url_token_source

        url = str(spec.get("url") or "")
        sas, sas_url = spec.get("sas"), spec.get("sas_url")
        key = ("blob", url, sas or "", sas_url or "")
        async with self._key_locks.setdefault(key, trio.Lock()):
            shared = self._backends.get(key)
            if shared is not None:
                return shared
            if sas_url:
                token_source = url_token_source(str(sas_url), timeout=SAS_FETCH_TIMEOUT)
            elif sas:
                token_source = static_token_source(Secret(str(sas)))
            else:
                raise HostError("invalid", "a blob dataset needs 'sas' or 'sas_url'")
            try:
                backend = BlobBackend.from_url(url, token_source=token_source,
                                               cache=self._cache())
            except AzfsError as exc:
                raise HostError("invalid", redact(str(exc))) from None
            await self._start(backend)
            shared = self._backends[key] = _Shared(key, backend)
            return shared

    def _cache(self):
        if self.cache is None and self.cache_dir is not None and self.cache_bytes > 0:
            from azfs.cache.block import BlockCache

            self.cache = BlockCache(self.cache_dir, self.cache_bytes)
        return self.cache

    async def _start(self, backend: Backend) -> None:
        # a posix start loads the usage ledger (a walk after a crash) in a worker
        # thread, so other kernels' I/O goes on meanwhile
        try:
            await backend.start()
        except (AzfsError, OSError) as exc:
            try:
                await backend.close()
            except Exception:  # noqa: BLE001 - the start error is the one to report
                log.debug("close after failed start", exc_info=True)
            raise HostError("backend-failed", redact(str(exc)) or type(exc).__name__) \
                from None

    async def _drop_user(self, shared: _Shared, path: tuple[str, ...] | None) -> None:
        if path is not None:
            shared.users.discard(path)
        if shared.users or self._backends.get(shared.key) is not shared:
            return
        del self._backends[shared.key]
        with trio.CancelScope(shield=True):
            try:
                await shared.backend.close()
            except Exception:  # noqa: BLE001 - one backend must not break the namespace
                log.exception("closing backend %r failed", shared.key[:2])

    async def close_all(self) -> None:
        for shared in list(self._backends.values()):
            shared.users.clear()
            await self._drop_user(shared, None)
        if self.cache is not None:
            self.cache.close()

    # ---- socket ----------------------------------------------------------------------
    async def serve_socket(self, socket_path: Path,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                           ) -> None:
        from azfs.sockets import bind_unix

        sock = trio.socket.from_stdlib_socket(bind_unix(socket_path))
        sock.listen(128)
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
                result = await self.attach(request["path"], request.get("view") or {},
                                           request["backend"],
                                           str(request.get("digest") or ""))
            elif op == "detach":
                result = await self.detach(request["path"])
            elif op == "refresh":
                result = self.refresh(request.get("path"))
            elif op == "list":
                result = self.list()
            elif op == "stats":
                result = self.stats()
            elif op == "health":
                result = self.health()
            else:
                raise HostError("invalid", f"unknown op {op!r}")
            return {"ok": True, "result": result}
        except HostError as exc:
            return {"ok": False, "code": exc.code, "message": redact(str(exc))}
        except Exception as exc:  # noqa: BLE001 - the socket must outlive any request
            # input was validated above: anything else is a fault of this process
            log.exception("request failed")
            return {"ok": False, "code": "internal", "message": redact(str(exc))}


def _open_vfolder(root: str, rel: str) -> tuple[int, os.stat_result]:
    """Runs in the volume's worker: both calls may wait on the share."""
    fd = open_beneath(root, rel)
    try:
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


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
    _check_path(request.get("path"))
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


def _check_path(path: object) -> tuple[str, ...]:
    if not isinstance(path, list | tuple) or not path or len(path) > 8:
        raise HostError("invalid", "path must be a list of 1-8 names")
    for comp in path:
        if not isinstance(comp, str) or not comp or comp in (".", "..") or "/" in comp \
                or "\0" in comp or len(comp) > 255:
            raise HostError("invalid", f"invalid path component {comp!r}")
    return tuple(path)


# ---- process entry point ----------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agentd.fusehost",
                                description="the azfs node FUSE process (started by agentd)")
    p.add_argument("--mountpoint", type=Path, required=True)
    p.add_argument("--socket", type=Path, required=True)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--cache-bytes", type=int, default=0)
    p.add_argument("--io-threads", type=int, default=IOLimits.threads)
    p.add_argument("--metadata-deadline", type=float, default=IOLimits.metadata_deadline)
    p.add_argument("--data-deadline", type=float, default=IOLimits.data_deadline)
    p.add_argument("--io-mode", choices=("auto", "threads", "inline"), default=IOLimits.mode)
    p.add_argument("--debug", action="store_true")
    return p


async def _run(args: argparse.Namespace) -> None:
    from azfs.fs.daemon import raise_fd_limit, serve

    raise_fd_limit()
    limits = IOLimits(threads=args.io_threads, metadata_deadline=args.metadata_deadline,
                      data_deadline=args.data_deadline, mode=args.io_mode)
    ops = AzfsOperations()
    host = FuseHost(ops, args.mountpoint, args.cache_dir, args.cache_bytes, limits)

    async def control() -> None:
        await host.serve_socket(args.socket)

    try:
        await serve(ops, args.mountpoint, [], tasks=[control])
    finally:
        with trio.CancelScope(shield=True):
            await host.close_all()
            Path(args.socket).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.debug else logging.INFO)
    try:
        trio.run(_run, args)
    except OSError as exc:
        log.error("fusehost: %s", exc)
        return 1 if exc.errno != errno.EPERM else 77
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
