"""The export service: what ``PUT``/``DELETE /v1/kernels/{id}`` do, and the restore at start.

An export of kernel K:

1. validates the request (:mod:`azfs.export`) and that every posix vfolder
   names a volume of the volume config;
2. acquires each distinct host volume once for K (mounted on first use,
   refcounted by :class:`~azfs.volumes.hostmount.HostMounter`);
3. checks each vfolder path inside its volume mount without following
   symlinks (:mod:`agentd.paths`; the fusehost opens it the same way);
4. attaches the views ``/kernels/K/<alias>`` in the fusehost;
5. makes K's home (:mod:`agentd.homes`) and places in it a bind of each
   view whose container path is under ``/home/work``, and of every
   ``startup`` volume at ``<volume>`` (read-only unless its mount options
   say ``rw``; skipped where a vfolder target overlaps).  Startup volumes
   are bound from their host mount directly: they are shared datasets, and
   a FUSE view would put a usage ledger into the volume and scan it;
6. records K in the journal and answers the OCI ``mounts``: the home at
   ``/home/work`` (``rbind``, ``rslave``), and a direct bind of each view
   whose container path is elsewhere (those are not re-bound after a
   fusehost restart).

A running kernel gets a vfolder more (:meth:`ExportService.attach_vfolder`)
or one less (:meth:`ExportService.detach_vfolder`) the same way: view and
bind, or the reverse, and the journal record is rewritten.

Any failure undoes steps 2-4 in reverse, so nothing half-done remains.  The
same request again answers the recorded mounts (idempotent), after
re-attaching any of K's views that went missing; another request for a
recorded K is a conflict.  Unexport removes K from the
journal first, then its views, then releases its volumes.

The journal is the truth: :meth:`ExportService.restore_volumes` rebuilds
the refcounts from it at start, :meth:`ExportService.reconcile_views` makes
the fusehost's namespace equal to it (attach missing views, detach
orphans) and then the kernels' homes (dead or missing binds replaced,
homes of unknown kernels removed), and orphan volume mounts are unmounted.
Reconciling takes an exclusive gate that exports and unexports hold shared,
so it never sees an export half-way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import trio
from pydantic import ValidationError

from agentd.config import Config
from agentd.errors import ApiError, BadRequest, Conflict, NotFoundError, Unavailable
from agentd.fuseclient import FuseHostClient, FuseHostError, FuseHostUnavailable
from agentd.homes import Bind, HomeError, KernelHomes
from agentd.journal import Journal
from agentd.paths import PathMissing, PathOutsideVolume, check_beneath
from azfs.errors import AzfsError
from azfs.export import CONTAINER_HOME, ExportRequest, ExportResponse, OciMount, VfolderExport
from azfs.secret import redact
from azfs.volumes.hostmount import HostMounter, MountError, unmount
from azfs.volumes.model import Volume, split_options
from azfs.volumes.mountinfo import MountEntry, mounts_under, read_mountinfo
from azfs.volumes.store import VolumeStore

log = logging.getLogger("agentd.exports")

KERNELS = "kernels"


class VolumeCatalog:
    """The volume config as last read from the store; re-read on an unknown name."""

    def __init__(self, store: VolumeStore) -> None:
        self.store = store
        self.volumes: dict[str, Volume] = {}
        self._loaded_at = 0.0
        self._lock = trio.Lock()

    async def reload(self) -> None:
        volumes = await trio.to_thread.run_sync(self.store.list)
        self.replace(volumes)

    def replace(self, volumes: list[Volume]) -> None:
        """Installs a new config (also the store's watch callback, from its thread)."""
        self.volumes = {v.name: v for v in volumes}
        self._loaded_at = time.monotonic()

    async def get(self, name: str) -> Volume | None:
        """The named volume; an unknown name re-reads the store (concurrent misses share
        one read), so a volume added a moment ago is found without waiting for a watch."""
        volume = self.volumes.get(name)
        if volume is not None:
            return volume
        asked = time.monotonic()
        async with self._lock:
            if self._loaded_at <= asked:
                try:
                    await self.reload()
                except (AzfsError, OSError) as exc:
                    log.warning("cannot re-read the volume config: %s", exc)
        return self.volumes.get(name)

    def startup(self) -> list[Volume]:
        return [v for v in self.volumes.values() if v.mount.at == "startup"]


class _Gate:
    """Shared for exports, exclusive for reconciling the namespace (which goes first
    once it waits, so a stream of exports cannot starve it)."""

    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._cond = trio.Condition()

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._cond:
            while self._writer or self._writers_waiting:
                await self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with trio.CancelScope(shield=True):
                async with self._cond:
                    self._readers -= 1
                    self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    await self._cond.wait()
            finally:
                self._writers_waiting -= 1
                self._cond.notify_all()  # readers held back by this waiter (if cancelled)
            self._writer = True
        try:
            yield
        finally:
            with trio.CancelScope(shield=True):
                async with self._cond:
                    self._writer = False
                    self._cond.notify_all()


def digest(path: list[str], view: dict, backend: dict) -> str:
    text = json.dumps({"path": path, "view": view, "backend": backend}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def view_label(vf: VfolderExport) -> str:
    """The metrics label of a view: the vfolder id, else where its data lives."""
    if vf.vfolder_id:
        return vf.vfolder_id
    if vf.kind == "posix":
        return f"{vf.volume}/{vf.path}"
    assert vf.dataset is not None
    return vf.dataset.url


class ExportService:
    def __init__(self, config: Config, catalog: VolumeCatalog, mounter: HostMounter,
                 client: FuseHostClient, journal: Journal) -> None:
        self.config = config
        self.catalog = catalog
        self.mounter = mounter
        self.client = client
        self.journal = journal
        #: startup volumes mounted by this agent: name → host mount path
        self.startup_mounts: dict[str, Path] = {}
        self.startup_failures: dict[str, str] = {}
        #: volumes acquired for kernels, as they were when acquired (for release)
        self._acquired: dict[str, Volume] = {}
        self._locks: dict[str, trio.Lock] = {}
        self.gate = _Gate()
        #: views of recorded kernels the last reconcile could not attach
        self.unrestored: dict[str, str] = {}
        self.homes = KernelHomes(config.state_dir)

    # ---- startup volumes --------------------------------------------------------
    async def mount_startup(self) -> None:
        volumes = self.catalog.startup()
        failures = await self.mounter.mount_startup(volumes)
        self.startup_failures = {name: redact(str(exc)) for name, exc in failures.items()}
        self.startup_mounts = {v.name: self.mounter.path_for(v.name) for v in volumes
                               if v.name not in failures}

    # ---- export ------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _kernel(self, kernel_id: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(kernel_id, trio.Lock())
        try:
            # the kernel's lock first: from setdefault on, this task is its holder or a
            # waiter (no checkpoint in between), so the pruning below never drops a lock
            # that another task is about to use
            async with lock, self.gate.shared():
                yield
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._locks.pop(kernel_id, None)

    async def export(self, kernel_id: str, request: ExportRequest) -> ExportResponse:
        body = request.model_dump(mode="json")
        async with self._kernel(kernel_id):
            record = self.journal.kernels.get(kernel_id)
            if record is not None:
                if record["request"] == body:
                    # make it so: views lost since (a failed restore) are attached again
                    for view in record["views"]:
                        await self._attach(view)
                        self.unrestored.pop("/".join(view["path"]), None)
                    await self._repair_home(kernel_id, record)
                    return ExportResponse.model_validate(record["response"])
                raise Conflict(f"kernel {kernel_id} is already exported with another request; "
                               "unexport it first", code="kernel-conflict")
            for vf in request.vfolders:
                if _in_home(vf.container_path) is None \
                        and _overlap(vf.container_path, CONTAINER_HOME):
                    raise BadRequest(f"vfolder {vf.alias!r}: {vf.container_path} would hide "
                                     f"the kernel's home {CONTAINER_HOME}")
            volumes = await self._volumes_of(request)
            acquired: list[Volume] = []
            attached: list[list[str]] = []
            home_made = False
            try:
                roots: dict[str, Path] = {}

                async def acquire(volume: Volume) -> None:
                    roots[volume.name] = await self._acquire(volume)
                    acquired.append(volume)

                await _each(acquire, volumes)
                views: list[dict[str, Any]] = [{} for _ in request.vfolders]

                async def plan(i: int) -> None:
                    views[i] = await self._plan_view(kernel_id, request,
                                                     request.vfolders[i], roots)

                await _each(plan, range(len(views)))

                async def attach(view: dict[str, Any]) -> None:
                    await self._attach(view)
                    attached.append(view["path"])

                await _each(attach, views)
                binds = self._binds(kernel_id, request)
                home_made = True
                await self._make_home(kernel_id, request.uid, request.gid, binds)
                response = ExportResponse(kernel_id=kernel_id,
                                          mounts=self._mounts(kernel_id, request))
                await self.journal.put(kernel_id, {
                    "request": body,
                    "views": views,
                    "volumes": [v.name for v in volumes],
                    "binds": [b.record() for b in binds],
                    "response": response.model_dump(mode="json"),
                    "created": time.time(),
                })
            except BaseException:
                with trio.CancelScope(shield=True):
                    if home_made:
                        await self._destroy_home(kernel_id)
                    await self._undo(attached, acquired)
                raise
            log.info("exported kernel %s: %d vfolders", kernel_id, len(request.vfolders))
            return response

    async def _volumes_of(self, request: ExportRequest) -> list[Volume]:
        names = sorted({vf.volume for vf in request.vfolders if vf.kind == "posix" and vf.volume})
        out = []
        for name in names:
            volume = await self.catalog.get(name)
            if volume is None:
                raise BadRequest(f"unknown volume {name!r}", code="unknown-volume")
            out.append(volume)
        return out

    async def _acquire(self, volume: Volume) -> Path:
        try:
            path = await self.mounter.acquire(volume)
        except MountError as exc:
            raise Unavailable(redact(str(exc)), code="volume-mount-failed") from None
        self._acquired[volume.name] = volume
        return path

    async def _plan_view(self, kernel_id: str, request: ExportRequest, vf: VfolderExport,
                         roots: dict[str, Path]) -> dict[str, Any]:
        path = [KERNELS, kernel_id, vf.alias]
        backend: dict[str, Any]
        if vf.kind == "posix":
            assert vf.volume is not None and vf.path is not None
            root = roots[vf.volume]
            try:
                await trio.to_thread.run_sync(check_beneath, root, vf.path)
            except PathOutsideVolume as exc:
                raise BadRequest(f"vfolder {vf.alias!r}: {exc}", code="path-outside-volume") \
                    from None
            except PathMissing as exc:
                raise ApiError(f"vfolder {vf.alias!r}: {exc}", code="vfolder-not-found",
                               status=404) from None
            except OSError as exc:
                raise Unavailable(f"vfolder {vf.alias!r}: volume {vf.volume!r}: "
                                  f"{exc.strerror}", code="volume-mount-failed") from None
            backend = {"kind": "posix", "volume_root": str(root), "path": vf.path,
                       "quota_bytes": vf.quota_bytes, "quota_files": vf.quota_files}
        else:
            assert vf.dataset is not None
            backend = {"kind": "blob", "url": vf.dataset.url, "sas": vf.dataset.sas,
                       "sas_url": vf.dataset.sas_url}
        view = {"label": view_label(vf), "read_only": vf.mode == "ro",
                "uid": request.uid, "gid": request.gid}
        return {"path": path, "view": view, "backend": backend,
                "digest": digest(path, view, backend)}

    async def _attach(self, view: dict[str, Any]) -> None:
        try:
            await self.client.attach(view["path"], view["view"], view["backend"],
                                     view["digest"])
        except FuseHostUnavailable as exc:
            raise Unavailable(str(exc), code="fusehost-unavailable") from None
        except FuseHostError as exc:
            alias = view["path"][-1]
            if exc.code == "path-outside-volume":
                raise BadRequest(f"vfolder {alias!r}: {exc}", code=exc.code) from None
            if exc.code == "vfolder-not-found":
                raise ApiError(f"vfolder {alias!r}: {exc}", code=exc.code, status=404) \
                    from None
            if exc.code == "backend-failed" and view["backend"]["kind"] == "blob":
                raise ApiError(f"dataset {alias!r}: {exc}", code="dataset-unavailable",
                               status=502) from None
            if exc.code == "exists":
                raise Conflict(f"vfolder {alias!r}: {exc}", code="kernel-conflict") from None
            raise ApiError(f"vfolder {alias!r}: {exc}", code="internal-error",
                           status=500) from None

    def _view_source(self, kernel_id: str, alias: str) -> str:
        return str(self.config.mountpoint / KERNELS / kernel_id / alias)

    def _binds(self, kernel_id: str, request: ExportRequest) -> list[Bind]:
        """What goes into the kernel's home: views under /home/work, then startup volumes."""
        binds = [Bind(rel=rel, source=self._view_source(kernel_id, vf.alias),
                      read_only=vf.mode == "ro")
                 for vf in request.vfolders if (rel := _in_home(vf.container_path))]
        if not self.config.bind_startup_volumes:
            return binds
        targets = [vf.container_path for vf in request.vfolders]
        for name, path in sorted(self.startup_mounts.items()):
            destination = f"{CONTAINER_HOME}/{name}"
            if any(_overlap(destination, t) for t in targets):
                continue
            volume = self.catalog.volumes.get(name)
            writable = volume is not None and any(
                k == "rw" and v is None for k, v in split_options(volume.mount.options))
            binds.append(Bind(rel=name, source=str(path), read_only=not writable))
        return binds

    def _mounts(self, kernel_id: str, request: ExportRequest) -> list[OciMount]:
        """The kernel's home at /home/work (rslave: later binds in it reach the running
        container), then a direct bind of each view whose container path is elsewhere."""
        mounts = [OciMount(destination=CONTAINER_HOME, source=str(self.homes.path(kernel_id)),
                           options=["rbind", "rslave", "rw"])]
        mounts += [OciMount(destination=vf.container_path,
                            source=self._view_source(kernel_id, vf.alias),
                            options=["rbind", vf.mode])
                   for vf in request.vfolders if not _in_home(vf.container_path)]
        return mounts

    async def _make_home(self, kernel_id: str, uid: int, gid: int, binds: list[Bind]) -> None:
        def work() -> None:
            self.homes.prepare(kernel_id, uid, gid)
            for bind in binds:
                self.homes.place(kernel_id, bind)

        try:
            await trio.to_thread.run_sync(work)
        except HomeError as exc:
            raise ApiError(f"kernel {kernel_id}: {exc.strerror}", code="kernel-home-failed",
                           status=500) from None

    async def _destroy_home(self, kernel_id: str) -> None:
        try:
            await trio.to_thread.run_sync(self.homes.destroy, kernel_id)
        except HomeError as exc:
            log.error("kernel %s: cannot remove its home: %s", kernel_id, exc.strerror)

    async def _undo(self, attached: list[list[str]], acquired: list[Volume]) -> None:
        for path in reversed(attached):
            try:
                await self.client.detach(path)
            except (FuseHostError, FuseHostUnavailable) as exc:
                log.error("rollback: cannot detach %s: %s (the next reconcile will)",
                          "/".join(path), exc)
        for volume in reversed(acquired):
            await self._release(volume.name)

    async def _release(self, name: str) -> None:
        volume = self._acquired.get(name) or await self.catalog.get(name)
        if volume is None:
            log.error("volume %r is gone from the config; cannot release it", name)
            return
        try:
            await self.mounter.release(volume)
        except MountError as exc:
            log.error("%s", exc)

    # ---- unexport -------------------------------------------------------------------
    async def unexport(self, kernel_id: str) -> bool:
        """Removes the kernel's views and releases its volumes; False if unknown."""
        async with self._kernel(kernel_id):
            record = self.journal.kernels.get(kernel_id)
            if record is None:
                return False
            with trio.CancelScope(shield=True):
                await self.journal.remove(kernel_id)
                await self._destroy_home(kernel_id)
                for view in record["views"]:
                    try:
                        await self.client.detach(view["path"])
                    except (FuseHostError, FuseHostUnavailable) as exc:
                        log.error("cannot detach %s: %s (the next reconcile will)",
                                  "/".join(view["path"]), exc)
                for name in record["volumes"]:
                    await self._release(name)
            prefix = f"{KERNELS}/{kernel_id}/"
            self.unrestored = {p: e for p, e in self.unrestored.items()
                               if not p.startswith(prefix)}
            log.info("unexported kernel %s", kernel_id)
            return True

    # ---- a running kernel's vfolders ------------------------------------------------------
    def _attachable(self, kernel_id: str) -> dict[str, Any]:
        record = self.journal.kernels.get(kernel_id)
        if record is None:
            raise NotFoundError(f"kernel {kernel_id} has no export", code="kernel-not-found")
        if "binds" not in record:
            raise BadRequest(f"kernel {kernel_id} was exported without a kernel home; "
                             "recreate it to attach or detach vfolders", code="not-attachable")
        return record

    async def attach_vfolder(self, kernel_id: str, vf: VfolderExport) -> ExportResponse:
        """Adds one vfolder to a running kernel: it appears at its path in the container.

        The same vfolder again is a no-op; another one with a taken alias or path
        is a conflict.  On failure nothing is left changed.
        """
        async with self._kernel(kernel_id):
            record = self._attachable(kernel_id)
            request = ExportRequest.model_validate(record["request"])
            if vf in request.vfolders:
                return ExportResponse.model_validate(record["response"])
            rel = _in_home(vf.container_path)
            if rel is None:
                raise BadRequest(f"vfolder {vf.alias!r}: {vf.container_path} is not under "
                                 f"{CONTAINER_HOME}; only paths there reach a running kernel",
                                 code="not-attachable")
            try:
                new_request = ExportRequest(uid=request.uid, gid=request.gid,
                                            vfolders=[*request.vfolders, vf])
            except ValidationError as exc:
                message = str(exc.errors()[0].get("msg", "conflict"))
                raise Conflict(f"vfolder {vf.alias!r}: "
                               f"{message.removeprefix('Value error, ')}",
                               code="alias-in-use") from None
            binds = [Bind.from_record(b) for b in record["binds"]]
            taken = next((b.rel for b in binds
                          if _overlap(vf.container_path, f"{CONTAINER_HOME}/{b.rel}")), None)
            if taken is not None:
                raise Conflict(f"vfolder {vf.alias!r}: {CONTAINER_HOME}/{taken} is in use in "
                               "the kernel", code="alias-in-use")
            acquired: list[Volume] = []
            attached: list[list[str]] = []
            bind = Bind(rel=rel, source=self._view_source(kernel_id, vf.alias),
                        read_only=vf.mode == "ro")
            try:
                roots: dict[str, Path] = {}
                if vf.kind == "posix":
                    assert vf.volume is not None
                    if vf.volume in record["volumes"]:
                        roots[vf.volume] = self.mounter.path_for(vf.volume)
                    else:
                        (volume,) = await self._volumes_of(
                            ExportRequest(vfolders=[vf]))
                        roots[vf.volume] = await self._acquire(volume)
                        acquired.append(volume)
                view = await self._plan_view(kernel_id, new_request, vf, roots)
                await self._attach(view)
                attached.append(view["path"])
                await self._place(kernel_id, bind)
                await self.journal.put(kernel_id, {
                    **record,
                    "request": new_request.model_dump(mode="json"),
                    "views": [*record["views"], view],
                    "volumes": sorted({*record["volumes"], *(v.name for v in acquired)}),
                    "binds": [*record["binds"], bind.record()],
                })
            except BaseException:
                with trio.CancelScope(shield=True):
                    if attached:
                        with contextlib.suppress(HomeError):
                            await trio.to_thread.run_sync(self.homes.remove, kernel_id, rel)
                    await self._undo(attached, acquired)
                raise
            log.info("kernel %s: attached vfolder %s at %s", kernel_id, vf.alias,
                     vf.container_path)
            return ExportResponse.model_validate(record["response"])

    async def detach_vfolder(self, kernel_id: str, alias: str) -> bool:
        """Removes one vfolder from a running kernel; False if it has none of that alias."""
        async with self._kernel(kernel_id):
            record = self._attachable(kernel_id)
            request = ExportRequest.model_validate(record["request"])
            vf = next((v for v in request.vfolders if v.alias == alias), None)
            if vf is None:
                return False
            rel = _in_home(vf.container_path)
            if rel is None:
                raise BadRequest(f"vfolder {alias!r} is bound directly at "
                                 f"{vf.container_path}; it goes with the kernel",
                                 code="not-attachable")
            try:
                await trio.to_thread.run_sync(self.homes.remove, kernel_id, rel)
            except HomeError as exc:
                raise ApiError(f"kernel {kernel_id}: {exc.strerror}",
                               code="kernel-home-failed", status=500) from None
            path = [KERNELS, kernel_id, alias]
            rest = [v for v in request.vfolders if v.alias != alias]
            still_used = {v.volume for v in rest if v.kind == "posix"}
            released = [n for n in record["volumes"]
                        if n == vf.volume and n not in still_used]
            with trio.CancelScope(shield=True):
                await self.journal.put(kernel_id, {
                    **record,
                    "request": ExportRequest(uid=request.uid, gid=request.gid,
                                             vfolders=rest).model_dump(mode="json"),
                    "views": [v for v in record["views"] if v["path"] != path],
                    "volumes": [n for n in record["volumes"] if n not in released],
                    "binds": [b for b in record["binds"] if b["rel"] != rel],
                })
                try:
                    await self.client.detach(path)
                except (FuseHostError, FuseHostUnavailable) as exc:
                    log.error("cannot detach %s: %s (the next reconcile will)",
                              "/".join(path), exc)
                for name in released:
                    await self._release(name)
            self.unrestored.pop("/".join(path), None)
            log.info("kernel %s: detached vfolder %s", kernel_id, alias)
            return True

    async def _place(self, kernel_id: str, bind: Bind) -> None:
        try:
            await trio.to_thread.run_sync(self.homes.place, kernel_id, bind)
        except HomeError as exc:
            raise ApiError(f"kernel {kernel_id}: {exc.strerror}", code="kernel-home-failed",
                           status=500) from None

    # ---- restore ------------------------------------------------------------------------
    async def restore_volumes(self) -> None:
        """Takes one reference per recorded kernel and volume (once, at start)."""
        for kernel_id, record in sorted(self.journal.kernels.items()):
            for name in record["volumes"]:
                volume = await self.catalog.get(name)
                if volume is None:
                    log.error("kernel %s: volume %r is no longer configured; its views "
                              "cannot be restored", kernel_id, name)
                    continue
                try:
                    await self._acquire(volume)
                except ApiError as exc:
                    log.error("kernel %s: %s", kernel_id, exc)

    async def reconcile_views(self) -> dict[str, int]:
        """Makes the fusehost's ``/kernels`` equal to the journal."""
        async with self.gate.exclusive():
            wanted = {tuple(v["path"]): v for r in self.journal.kernels.values()
                      for v in r["views"]}
            present = {tuple(v["path"]): v["digest"] for v in await self.client.list()}
            detached = attached = failed = 0
            unrestored: dict[str, str] = {}
            for path, dig in present.items():
                if path[0] == KERNELS and (path not in wanted or wanted[path]["digest"] != dig):
                    await self.client.detach(list(path))
                    detached += 1
            for path, view in wanted.items():
                if present.get(path) == view["digest"]:
                    continue
                try:
                    await self.client.attach(view["path"], view["view"], view["backend"],
                                             view["digest"])
                    attached += 1
                except FuseHostError as exc:
                    failed += 1
                    unrestored["/".join(path)] = str(exc)
                    log.error("cannot restore view %s: %s", "/".join(path), exc)
            self.unrestored = unrestored
            if attached or detached or failed:
                log.info("reconciled the namespace: %d attached, %d detached, %d failed",
                         attached, detached, failed)
            rebound = await self._reconcile_homes()
            return {"attached": attached, "detached": detached, "failed": failed,
                    "rebound": rebound}

    async def _reconcile_homes(self) -> int:
        """Replaces the dead or missing binds in the recorded kernels' homes and removes
        the homes of kernels the journal does not know (a crash's leftovers)."""
        devices = await trio.to_thread.run_sync(self._devices)
        rebound = 0
        for kernel_id, record in sorted(self.journal.kernels.items()):
            if "binds" not in record:
                continue  # recorded before kernels had homes: direct binds only
            binds = [Bind.from_record(b) for b in record["binds"]]
            states = await trio.to_thread.run_sync(self.homes.states, kernel_id, binds,
                                                   devices)
            stale = [b for b in binds if states[b.rel] != "live"]
            if not stale:
                continue
            request = record["request"]
            try:
                await trio.to_thread.run_sync(self._rebind, kernel_id, request, stale)
                rebound += len(stale)
                log.warning("kernel %s: re-bound %s", kernel_id,
                            ", ".join(f"{b.rel} ({states[b.rel]})" for b in stale))
            except HomeError as exc:  # the others are placed; this one waits for a retry
                log.error("kernel %s: cannot re-bind its vfolders: %s", kernel_id,
                          exc.strerror)
        known = set(self.journal.kernels)
        for kernel_id in await trio.to_thread.run_sync(self.homes.on_disk):
            if kernel_id not in known:
                log.warning("removing the home of kernel %s: it has no recorded export",
                            kernel_id)
                await self._destroy_home(kernel_id)
        return rebound

    async def _repair_home(self, kernel_id: str, record: dict[str, Any]) -> None:
        """Re-places the binds of one recorded kernel that are not live."""
        if "binds" not in record:
            return
        binds = [Bind.from_record(b) for b in record["binds"]]
        devices = await trio.to_thread.run_sync(self._devices)
        states = await trio.to_thread.run_sync(self.homes.states, kernel_id, binds, devices)
        stale = [b for b in binds if states[b.rel] != "live"]
        if stale:
            try:
                await trio.to_thread.run_sync(self._rebind, kernel_id, record["request"],
                                              stale)
            except HomeError as exc:
                raise ApiError(f"kernel {kernel_id}: {exc.strerror}",
                               code="kernel-home-failed", status=500) from None

    def _rebind(self, kernel_id: str, request: dict[str, Any], binds: list[Bind]
                ) -> list[str]:
        """Places each bind (one that fails does not stop the others); answers the ones
        placed, raises the first failure after trying them all."""
        self.homes.prepare(kernel_id, int(request.get("uid", 1000)),
                           int(request.get("gid", 1000)))
        placed, failed = [], []
        for bind in binds:
            try:
                self.homes.place(kernel_id, bind)
                placed.append(bind.rel)
            except HomeError as exc:
                failed.append(exc)
        if failed:
            if placed:
                log.warning("kernel %s: re-bound %s", kernel_id, ", ".join(placed))
            raise failed[0]
        return placed

    def _devices(self, table: list[MountEntry] | None = None) -> dict[str, str]:
        """Source prefix → the device its binds must show (the live FUSE mount, volumes)."""
        table = read_mountinfo() if table is None else table
        tops = {e.mount_point: e for e in table}  # the last entry at a path is the top
        out = {}
        for path in (self.config.mountpoint, *self.startup_mounts.values()):
            entry = tops.get(str(path))
            if entry is not None:
                out[str(path)] = entry.device
        return out

    async def rebind_needed(self) -> bool:
        """True if a kernel has a bind that is not live and that a reconcile can fix (not
        one of a view the last reconcile could not restore: that waits for its export)."""
        status = await self.binds_status()
        for kernel_id, binds in status.items():
            if binds["live"]:
                continue
            record = self.journal.kernels.get(kernel_id) or {}
            sources = {b["rel"]: b["source"] for b in record.get("binds", [])}
            for rel, state in binds["binds"].items():
                view = _view_path(sources.get(rel, ""), self.config.mountpoint)
                if state != "live" and view not in self.unrestored:
                    return True
        return False

    async def binds_status(self) -> dict[str, dict[str, Any]]:
        """Per kernel: whether every bind in its home is live, and each bind's state."""
        kernels = dict(self.journal.kernels)

        def work() -> dict[str, dict[str, Any]]:
            table = read_mountinfo()  # once for all kernels: the watchdog asks often
            devices = self._devices(table)
            out: dict[str, dict[str, Any]] = {}
            for kernel_id, record in sorted(kernels.items()):
                binds = [Bind.from_record(b) for b in record.get("binds", [])]
                states = self.homes.states(kernel_id, binds, devices, table)
                out[kernel_id] = {"live": all(s == "live" for s in states.values()),
                                  "binds": states}
            return out

        return await trio.to_thread.run_sync(work)

    async def unmount_orphans(self) -> list[str]:
        """Unmounts volume mounts under the state dir that nothing uses (a crash's leftovers)."""
        held = set(self.mounter.mounts()) | set(self.startup_mounts)
        orphans = []
        for entry in await trio.to_thread.run_sync(mounts_under, self.mounter.volumes_dir):
            rel = Path(entry.mount_point).relative_to(self.mounter.volumes_dir)
            if rel.parts and rel.parts[0] not in held and len(rel.parts) == 1:
                orphans.append(entry.mount_point)
        for mount_point in orphans:
            log.warning("unmounting %s: no recorded export uses it", mount_point)
            try:
                await trio.to_thread.run_sync(unmount, mount_point)
                with contextlib.suppress(OSError):
                    Path(mount_point).rmdir()
            except MountError as exc:
                log.error("%s", exc)
        return orphans

    # ---- queries ------------------------------------------------------------------------
    def kernels(self) -> dict[str, dict[str, Any]]:
        return self.journal.kernels

    async def volume_status(self) -> list[dict[str, Any]]:
        mounted = self.mounter.mounts()
        out = []
        for name in sorted(set(self.catalog.volumes) | set(mounted)):
            volume = self.catalog.volumes.get(name) or self._acquired.get(name)
            path, refs = mounted.get(name, (None, 0))
            out.append({
                "name": name,
                "fstype": volume.mount.fstype if volume else None,
                "at": volume.mount.at if volume else None,
                "mounted": name in mounted,
                "path": str(path) if path else None,
                "refcount": refs,
                "error": self.startup_failures.get(name),
            })
        return out

    def volume_refcounts(self) -> dict[str, int]:
        return {name: refs for name, (_, refs) in self.mounter.mounts().items()}


async def _each(fn: Callable[[Any], Awaitable[None]], items: Iterable[Any]) -> None:
    """Runs ``fn`` on every item concurrently, each to its end (none is cancelled half-way,
    so what succeeded is known for the rollback), then raises the first item's error."""
    items = list(items)
    if len(items) == 1:
        await fn(items[0])
        return
    errors: dict[int, Exception] = {}

    async def one(i: int) -> None:
        try:
            await fn(items[i])
        except Exception as exc:  # noqa: BLE001 - collected, re-raised below
            errors[i] = exc

    async with trio.open_nursery() as nursery:
        for i in range(len(items)):
            nursery.start_soon(one, i)
    if errors:
        raise errors[min(errors)]


def _view_path(source: str, mountpoint: Path) -> str | None:
    """``kernels/<id>/<alias>`` of a bind's source in the FUSE mount, else None."""
    prefix = str(mountpoint).rstrip("/") + "/"
    return source[len(prefix):] if source.startswith(prefix) else None


def _in_home(container_path: str) -> str | None:
    """``container_path`` relative to /home/work, or None if it is not below it."""
    prefix = CONTAINER_HOME + "/"
    return container_path[len(prefix):] if container_path.startswith(prefix) else None


def _overlap(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")

