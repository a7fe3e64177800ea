"""The node's FUSE namespace: attached views and the backends behind them.

:class:`FuseHost` keeps what the node's FUSE process shows: one view per
kernel and vfolder at ``/kernels/<id>/<alias>``, each on a backend that
views of the same vfolder directory (or the same blob source) share, so one
usage ledger counts for all kernels; every host volume's I/O
(:class:`~azfs.volumes.io.VolumeIO`) and the node-wide block cache.  A
backend is started before its first view and closed after its last one is
detached.  ``attach`` of a path that exists with the same ``digest``
succeeds without change (the agent replays its journal after a restart);
with another digest it is refused with ``exists``.  Requests reach it over
the control socket (:mod:`agentd.hostrpc`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from agentd.paths import PathMissing, PathOutsideVolume, open_beneath
from azfs.backends.base import Backend
from azfs.errors import AzfsError
from azfs.fs.inodes import View
from azfs.fs.operations import AzfsOperations
from azfs.secret import Secret, redact
from azfs.usage import Quota
from azfs.volumes.io import IOLimits, Kind, VolumeIO

if TYPE_CHECKING:
    from azfs.backends.blob import BlobBackend
    from azfs.blob.sas import TokenPool, TokenSource

log = logging.getLogger("agentd.fusehost")

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
    #: the host volume's I/O of a posix backend
    io: VolumeIO | None = None
    #: a blob backend's credentials: each attached kernel's SAS source
    tokens: TokenPool | None = None


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
        key_path = check_path(path)
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
            shared = await self._backend_for(backend, key_path)
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
                await self._drop_user(shared, key_path)
                raise
            shared.users.add(key_path)
            self._attached[key_path] = _Attached(key_path, v, shared, digest,
                                                 str(backend.get("kind")))
            log.info("attached %s (%s%s)", "/".join(key_path), backend.get("kind"),
                     ", ro" if v.read_only else "")
            return {"path": list(key_path), "created": True}

    async def detach(self, path: Sequence[str]) -> dict:
        key_path = check_path(path)
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

    async def refresh(self, path: Sequence[str]) -> dict:
        """Forgets the cached listings of the dataset attached at ``path`` (every view's)."""
        key_path = check_path(path)
        entry = self._attached.get(key_path)
        if entry is None:
            raise HostError("not-found", f"{'/'.join(key_path)} is not attached")
        if entry.kind != "blob":
            raise HostError("invalid", f"{'/'.join(key_path)} is not a blob dataset")
        await self.ops.refresh(entry.shared.backend)
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
            usage = shared.backend.usage_now()
            if usage is not None:
                out["usage"][label] = {"bytes": usage.bytes, "files": usage.files,
                                       "quota_bytes": usage.quota_bytes,
                                       "quota_files": usage.quota_files}
            counters = shared.backend.stats()
            if counters:
                out["blob"][label] = counters
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
                "cache_bytes": self.cache_bytes, "xattrs": self.ops.xattrs,
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

    async def _backend_for(self, spec: dict, owner: tuple[str, ...]) -> _Shared:
        kind = spec.get("kind")
        if kind == "posix":
            return await self._posix(spec)
        if kind == "blob":
            return await self._blob(spec, owner)
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
                    shared.backend.set_quota(quota.bytes, quota.files)
                    return shared
                # /proc/self/fd/N names exactly the directory reached without symlinks
                backend = PosixBackend(f"/proc/self/fd/{fd}", quota=quota, io=io)
                backend.source = Path(root, rel)
                await self._start(backend)
                shared = self._backends[key] = _Shared(key, backend, io=io)
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
                                    if s.io is io)
            out[io.name] = entry
        return out

    async def _blob(self, spec: dict, owner: tuple[str, ...]) -> _Shared:
        """The dataset's one backend on the node, reading with the kernels' own SAS.

        Every kernel's views of a dataset share its listings, read-ahead and
        page cache; a kernel joining one already read must bring a SAS that
        reads it (probed), so no kernel reads with another's credential alone.
        """
        from azfs.backends.blob import BlobBackend
        from azfs.blob.sas import TokenPool, static_token_source, url_token_source

        url = str(spec.get("url") or "")
        sas, sas_url = spec.get("sas"), spec.get("sas_url")
        if sas_url:
            source = url_token_source(str(sas_url), timeout=SAS_FETCH_TIMEOUT)
        elif sas:
            source = static_token_source(Secret(str(sas)))
        else:
            raise HostError("invalid", "a blob dataset needs 'sas' or 'sas_url'")
        key = ("blob", url)
        async with self._key_locks.setdefault(key, trio.Lock()):
            shared = self._backends.get(key)
            if shared is not None:
                assert shared.tokens is not None
                await self._admit(shared.backend, source)
                shared.tokens.add(owner, source)
                return shared
            pool = TokenPool()
            pool.add(owner, source)
            try:
                backend = BlobBackend.from_url(url, token_source=pool, cache=self._cache())
            except AzfsError as exc:
                raise HostError("invalid", redact(str(exc))) from None
            await self._start(backend)
            shared = self._backends[key] = _Shared(key, backend, tokens=pool)
            return shared

    @staticmethod
    async def _admit(backend: BlobBackend, source: TokenSource) -> None:
        """Probes a joining kernel's SAS, taken from its source as a new backend's is
        (its renewal URL when it has one: a SAS replayed from the journal may be old)."""
        from azfs.blob.sas import fetch
        from azfs.blob.url import normalize_sas

        try:
            with trio.fail_after(SAS_FETCH_TIMEOUT):
                await backend.http.probe(Secret(normalize_sas(await fetch(source))))
        except (AzfsError, trio.TooSlowError) as exc:
            raise HostError("backend-failed", redact(str(exc)) or "the SAS source timed out") \
                from None

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
            if shared.tokens is not None:
                shared.tokens.remove(path)  # that kernel's SAS source is never asked again
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


def _open_vfolder(root: str, rel: str) -> tuple[int, os.stat_result]:
    """Runs in the volume's worker: both calls may wait on the share."""
    fd = open_beneath(root, rel)
    try:
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def check_path(path: object) -> tuple[str, ...]:
    if not isinstance(path, list | tuple) or not path or len(path) > 8:
        raise HostError("invalid", "path must be a list of 1-8 names")
    for comp in path:
        if not isinstance(comp, str) or not comp or comp in (".", "..") or "/" in comp \
                or "\0" in comp or len(comp) > 255:
            raise HostError("invalid", f"invalid path component {comp!r}")
    return tuple(path)
