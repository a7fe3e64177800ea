"""Kernels: turn "start a kernel with these folders" into an export request for an agent.

Create: one transaction resolves every requested vfolder (ownership,
sharing, permission, lifecycle state), adds the owner's dot-folders, marks
the vfolders ``mounted`` (a conditional UPDATE, so a concurrent trash waits
and then sees ``mounted``) and records the kernel as ``creating``.  Only then
is the agent asked; if it refuses, the records are undone.  A retried create
with the same request returns the same kernel.

Destroy: the kernel is marked ``destroying`` and stays recorded (its
vfolders stay in use) until the agent confirms the export is gone.

Attach / detach (a running kernel): the vfolder is resolved for the kernel's
owner with the same checks as a create, marked ``mounted`` and recorded as
one more mount of the kernel in one transaction; then the agent is asked,
and a refusal undoes the records.  Detach asks the agent first and then
drops the mount, freeing the vfolder if no other kernel uses it.

Datasets: the agent gets a SAS and a renewal URL that carries a random key
of that kernel mount (only its hash is stored); the URL stops working when
the kernel is destroyed or its owner loses access to the dataset.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import uuid
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import trio
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import delete, exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from azfs.export import ExportRequest, VfolderExport, resolve_target, validate_kernel_id
from managerd.agent_client import AgentAddress, AgentClient, AgentUnreachable
from managerd.auth import Principal
from managerd.db.models import (
    EXPORTABLE,
    MOUNTED,
    READY,
    Kernel,
    KernelMount,
    User,
    Vfolder,
    iso,
    now,
)
from managerd.db.session import Database
from managerd.errors import ApiError, Conflict, Forbidden, InvalidArgument, NotFound
from managerd.services import datasets as ds_service
from managerd.services.agents import AgentDirectory
from managerd.services.vfolders import resolve

log = logging.getLogger(__name__)


class KernelNotFound(NotFound):
    code = "kernel-not-found"


class VfolderRequest(BaseModel):
    vfolder: str = Field(description="vfolder id or alias", min_length=1, max_length=64)
    mode: str | None = Field(default=None, description="ro | rw; default: the caller's access")
    target: str | None = Field(default=None, max_length=1024,
                               description="container path; default /home/work/<alias>")
    alias: str | None = Field(default=None, max_length=64,
                              description="name in the kernel; default the vfolder's alias")


class DatasetRequest(BaseModel):
    dataset: str = Field(min_length=1, max_length=64)
    target: str | None = Field(default=None, max_length=1024)
    alias: str | None = Field(default=None, max_length=64)


class KernelRequest(BaseModel):
    kernel_id: str = Field(min_length=1, max_length=128)
    agent: str = Field(min_length=1, max_length=64)
    vfolders: list[VfolderRequest] = Field(default_factory=list, max_length=64)
    datasets: list[DatasetRequest] = Field(default_factory=list, max_length=64)
    #: also export the owner's dot-folders (aliases starting with '.')
    dotfolders: bool = True
    #: the user the kernel runs for (admins, e.g. a scheduler); default: the caller
    owner: str | None = None


def request_hash(who: Principal, request: KernelRequest) -> str:
    body = json.dumps({"owner": who.id, **request.model_dump()}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def kernel_dict(kernel: Kernel, owner: str, mounts: list[KernelMount]) -> dict[str, Any]:
    return {
        "kernel_id": kernel.id, "owner": owner, "agent": kernel.agent,
        "status": kernel.status, "created_at": iso(kernel.created_at),
        "vfolders": [{"alias": m.alias, "mode": m.mode, "target": m.target,
                      "vfolder_id": str(m.vfolder_id) if m.vfolder_id else None,
                      "kind": "posix" if m.vfolder_id else "blob"} for m in mounts],
        "mounts": json.loads(kernel.mounts_json),
    }


class KernelService:
    def __init__(self, db: Database, agents: AgentDirectory,
                 datasets: ds_service.DatasetService, agent_timeout: float = 30.0,
                 public_url: str | None = None) -> None:
        self.db = db
        self.agents = agents
        self.datasets = datasets
        self.agent_timeout = agent_timeout
        #: base URL agents call back on (SAS renewal); None: agents get a SAS only.
        self.public_url = public_url

    async def create(self, who: Principal, request: KernelRequest) -> tuple[dict, bool]:
        """Returns (kernel, created); ``created`` is False for a recognised retry."""
        try:
            validate_kernel_id(request.kernel_id)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if request.owner is not None and request.owner != who.name:
            if not who.is_admin:
                raise Forbidden("only admins create kernels for other users")
            who = await self.db.read(_principal_of, request.owner)
        address = await self.agents.resolve(request.agent)
        digest = request_hash(who, request)
        prepared = await self.db.run(self._prepare, who, request, digest)
        if isinstance(prepared, dict):
            return prepared, False
        export: ExportRequest = prepared
        client = AgentClient(address, self.agent_timeout)
        try:
            answer = await client.export(request.kernel_id, export)
        except BaseException as exc:
            # Undo, even when the request itself is being cancelled.  Unless the agent
            # answered with a refusal, it may have applied the export: ask it to drop it.
            with trio.CancelScope(shield=True):
                if not isinstance(exc, ApiError) or isinstance(exc, AgentUnreachable):
                    with trio.move_on_after(self.agent_timeout):
                        try:
                            await client.unexport(request.kernel_id)
                        except ApiError as undo:
                            log.warning("kernel %s: export may be left on agent %s: %s",
                                        request.kernel_id, request.agent, undo.message)
                await self.db.run(_forget, request.kernel_id)
            raise
        mounts = [m.model_dump(mode="json") for m in answer.mounts]
        return await self.db.run(_running, request.kernel_id, mounts, who.name), True

    def _prepare(self, session: Session, who: Principal, request: KernelRequest,
                 digest: str) -> ExportRequest | dict:
        existing = session.get(Kernel, request.kernel_id)
        if existing is not None and existing.status == "gone":
            session.delete(existing)  # it died with its node: the id is free again
            session.flush()
            existing = None
        if existing is not None:
            same = existing.owner_id == who.id and existing.request_hash == digest
            if same and existing.status == "running":
                return _describe(session, existing)
            if same:
                raise Conflict(f"kernel {request.kernel_id!r} is {existing.status}; "
                               "retry later", code="kernel-exists")
            raise Conflict(f"kernel {request.kernel_id!r} exists "
                           f"({existing.status}) with a different request",
                           code="kernel-exists")
        user = session.get(User, who.id)
        assert user is not None
        exports: list[VfolderExport] = []
        rows: list[KernelMount] = []
        chosen: set = set()
        for item in request.vfolders:
            access = resolve(session, who, item.vfolder)
            vf = access.vfolder
            if vf.id in chosen:
                raise InvalidArgument(f"vfolder {vf.alias!r} is requested twice")
            chosen.add(vf.id)
            allowed = {"owner": vf.permission, "admin": "rw", "ro": "ro"}.get(access.role, "rw")
            mode = item.mode or allowed
            if mode not in ("ro", "rw"):
                raise InvalidArgument("mode must be 'ro' or 'rw'")
            if mode == "rw" and allowed == "ro":
                raise Forbidden(f"your access to vfolder {vf.alias!r} is read-only")
            exports.append(_posix(vf, item.alias or vf.alias, mode, item.target))
        if request.dotfolders:
            for vf in session.scalars(select(Vfolder).where(
                    Vfolder.owner_id == who.id, Vfolder.alias.startswith("."),
                    Vfolder.status.in_(EXPORTABLE))):
                if vf.id not in chosen and vf.alias not in {e.alias for e in exports}:
                    chosen.add(vf.id)
                    exports.append(_posix(vf, vf.alias, vf.permission, None))
        datasets: dict[str, tuple[int, str | None]] = {}
        for item in request.datasets:
            dataset = ds_service.readable(session, who, item.dataset)
            alias = item.alias or dataset.name
            key = secrets.token_urlsafe(32)
            sas_url = (f"{self.public_url}/v1/kernels/{request.kernel_id}/datasets/"
                       f"{quote(alias, safe='')}/sas?key={key}") if self.public_url else None
            try:
                exports.append(VfolderExport(alias=alias, kind="blob", mode="ro",
                                             dataset=self.datasets.source(dataset, sas_url),
                                             target=item.target))
            except ValidationError as exc:
                raise InvalidArgument(_first_error(exc)) from None
            datasets[alias] = (dataset.id, _digest(key) if sas_url else None)
        try:
            export = ExportRequest(uid=user.uid, gid=user.gid, vfolders=exports)
        except ValidationError as exc:
            raise InvalidArgument(_first_error(exc)) from None
        session.add(Kernel(id=request.kernel_id, owner_id=who.id, agent=request.agent,
                           status="creating", request_hash=digest, mounts_json="[]"))
        try:
            session.flush()
        except IntegrityError:
            raise Conflict(f"kernel {request.kernel_id!r} is being created by another "
                           "request", code="kernel-exists") from None
        # lock the vfolder rows in one global order, so two kernels never deadlock
        posix = sorted(_uuid(v.vfolder_id) for v in export.vfolders if v.kind == "posix")
        for vfid in posix:
            result = session.execute(
                update(Vfolder).where(Vfolder.id == vfid, Vfolder.status.in_(EXPORTABLE))
                .values(status=MOUNTED))
            if result.rowcount != 1:
                alias = next(v.alias for v in export.vfolders if v.vfolder_id == str(vfid))
                raise Conflict(f"vfolder {alias!r} is not ready to be exported",
                               code="vfolder-bad-state")
        for item in export.vfolders:
            rows.append(KernelMount(
                kernel_id=request.kernel_id, alias=item.alias, mode=item.mode,
                target=item.container_path,
                vfolder_id=_uuid(item.vfolder_id) if item.kind == "posix" else None,
                dataset_id=datasets[item.alias][0] if item.kind == "blob" else None,
                renew_hash=datasets[item.alias][1] if item.kind == "blob" else None))
        session.add_all(rows)
        return export

    async def attach(self, who: Principal, kernel_id: str, item: VfolderRequest
                     ) -> dict[str, Any]:
        """Adds a vfolder to a running kernel; answers the kernel record."""
        prepared = await self.db.run(_prepare_attach, who, kernel_id, item)
        if isinstance(prepared, dict):
            return prepared  # a retry: already attached
        export, agent, mount_id = prepared
        address = await self._address_or_undo(agent, mount_id)
        client = AgentClient(address, self.agent_timeout)
        try:
            answer = await client.attach(kernel_id, export)
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                if not isinstance(exc, ApiError) or isinstance(exc, AgentUnreachable):
                    with trio.move_on_after(self.agent_timeout):
                        try:
                            await client.detach(kernel_id, export.alias)
                        except ApiError as undo:
                            log.warning("kernel %s: vfolder %s may be left attached on "
                                        "agent %s: %s", kernel_id, export.alias, agent,
                                        undo.message)
                await self.db.run(_drop_mount, mount_id)
            raise
        mounts = [m.model_dump(mode="json") for m in answer.mounts]
        return await self.db.run(_attached, kernel_id, mounts)

    async def _address_or_undo(self, agent: str, mount_id: int) -> AgentAddress:
        try:
            return await self.agents.resolve(agent)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.db.run(_drop_mount, mount_id)
            raise

    async def detach(self, who: Principal, kernel_id: str, alias: str) -> dict[str, Any]:
        """Removes a vfolder from a running kernel (the agent first); answers the record."""
        found = await self.db.read(_mount_of, who, kernel_id, alias)
        if found is None:
            return await self.info(who, kernel_id)  # already detached
        agent, mount_id = found
        address = await self.agents.resolve(agent)
        await AgentClient(address, self.agent_timeout).detach(kernel_id, alias)
        await self.db.run(_drop_mount, mount_id)
        return await self.info(who, kernel_id)

    async def destroy(self, who: Principal, kernel_id: str, force: bool = False) -> None:
        """Asks the agent to drop the export, then forgets the kernel.

        ``force`` (admins): forget it even if the agent cannot be reached — for a
        node that is gone for good; its vfolders become free again.
        """
        if force and not who.is_admin:
            raise Forbidden("only admins may force-destroy a kernel")
        if not force:  # a down agent: refuse before anything changes
            agent = await self.db.read(_destroy_target, who, kernel_id)
            if agent is not None:
                await self.agents.resolve(agent)
        agent = await self.db.run(_begin_destroy, who, kernel_id)
        if agent is None:
            return
        try:
            address = await self.agents.resolve(agent)
            await AgentClient(address, self.agent_timeout).unexport(kernel_id)
        except ApiError as exc:
            if not force:
                raise
            log.warning("kernel %s forgotten without its agent %s: %s", kernel_id, agent,
                        exc.message)
        await self.db.run(_forget, kernel_id)

    async def info(self, who: Principal, kernel_id: str) -> dict[str, Any]:
        def work(session: Session) -> dict[str, Any]:
            return _describe(session, _visible(session, who, kernel_id))

        return await self.db.read(work)

    async def list(self, who: Principal, everyone: bool = False) -> list[dict[str, Any]]:
        if everyone and not who.is_admin:
            raise Forbidden("only admins may list every kernel")

        def work(session: Session) -> list[dict[str, Any]]:
            query = select(Kernel).order_by(Kernel.created_at)
            if not everyone:
                query = query.where(Kernel.owner_id == who.id)
            return [_describe(session, k) for k in session.scalars(query)]

        return await self.db.read(work)

    async def renew_sas(self, kernel_id: str, alias: str, key: str) -> dict[str, Any]:
        """A fresh SAS for the agent serving dataset ``alias`` of ``kernel_id``."""

        def work(session: Session) -> Any:
            row = session.execute(
                select(KernelMount, Kernel).join(Kernel, Kernel.id == KernelMount.kernel_id)
                .where(KernelMount.kernel_id == kernel_id, KernelMount.alias == alias,
                       KernelMount.dataset_id.is_not(None))).first()
            if row is None or row[0].renew_hash is None \
                    or not hmac.compare_digest(row[0].renew_hash, _digest(key)) \
                    or row[1].status not in ("creating", "running"):
                raise KernelNotFound("no such kernel dataset, or a wrong renewal key")
            owner = session.get(User, row[1].owner_id)
            assert owner is not None
            who = Principal(owner.id, owner.name, owner.is_admin, owner.uid, owner.gid)
            dataset = session.get(ds_service.Dataset, row[0].dataset_id)
            assert dataset is not None
            return ds_service.readable(session, who, dataset.name)

        dataset = await self.db.read(work)
        return await trio.to_thread.run_sync(self.datasets.renewal, dataset)

    async def recover(self, min_age: float = 0.0) -> None:
        """A kernel left ``creating`` by a crash is undone if its agent agrees.

        ``min_age``: only creates older than that (seconds), so that the creates
        other managers have in flight are left alone."""
        cutoff = now() - timedelta(seconds=min_age)
        stale = await self.db.read(lambda s: [
            (k.id, k.agent) for k in s.scalars(select(Kernel).where(
                Kernel.status == "creating", Kernel.created_at <= cutoff))])
        for kernel_id, agent in stale:
            try:
                address = await self.agents.resolve(agent)
                await AgentClient(address, self.agent_timeout).unexport(kernel_id)
            except ApiError as exc:
                log.warning("kernel %s left creating; agent %s: %s", kernel_id, agent,
                            exc.message)
                continue
            await self.db.run(_forget, kernel_id)


def _principal_of(session: Session, name: str) -> Principal:
    user = session.scalars(select(User).where(User.name == name)).first()
    if user is None:
        raise NotFound(f"no user named {name!r}", code="user-not-found")
    return Principal(user.id, user.name, user.is_admin, user.uid, user.gid)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _uuid(value: str | None) -> uuid.UUID:
    return uuid.UUID(str(value))


def _posix(vf: Vfolder, alias: str, mode: str, target: str | None) -> VfolderExport:
    try:
        resolve_target(target, alias)
        return VfolderExport(alias=alias, kind="posix", mode=mode, volume=vf.volume,
                             path=vf.path, quota_bytes=vf.quota_bytes,
                             quota_files=vf.quota_files, target=target,
                             vfolder_id=str(vf.id))
    except (ValidationError, ValueError) as exc:
        raise InvalidArgument(_first_error(exc)) from None


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        return str(err.get("msg", "invalid request")).removeprefix("Value error, ")
    return str(exc)


def _visible(session: Session, who: Principal, kernel_id: str) -> Kernel:
    kernel = session.get(Kernel, kernel_id)
    if kernel is None or (kernel.owner_id != who.id and not who.is_admin):
        raise KernelNotFound(f"no kernel {kernel_id!r}")
    return kernel


def _describe(session: Session, kernel: Kernel) -> dict[str, Any]:
    owner = session.scalar(select(User.name).where(User.id == kernel.owner_id)) or ""
    mounts = list(session.scalars(select(KernelMount).where(
        KernelMount.kernel_id == kernel.id).order_by(KernelMount.id)))
    return kernel_dict(kernel, owner, mounts)


def _running(session: Session, kernel_id: str, mounts: list, owner: str) -> dict[str, Any]:
    kernel = session.get(Kernel, kernel_id)
    assert kernel is not None
    kernel.status = "running"
    kernel.mounts_json = json.dumps(mounts)
    session.flush()
    return _describe(session, kernel)


def _owner_of(session: Session, kernel: Kernel) -> Principal:
    owner = session.get(User, kernel.owner_id)
    assert owner is not None
    return Principal(owner.id, owner.name, owner.is_admin, owner.uid, owner.gid)


def _prepare_attach(session: Session, who: Principal, kernel_id: str, item: VfolderRequest
                    ) -> tuple[VfolderExport, str, int] | dict[str, Any]:
    """Checks and records one more vfolder of a running kernel, as its owner may use it."""
    kernel = _visible(session, who, kernel_id)
    if kernel.status != "running":
        raise Conflict(f"kernel {kernel_id!r} is {kernel.status}; vfolders are attached "
                       "to running kernels only", code="conflict")
    owner = _owner_of(session, kernel)
    access = resolve(session, owner, item.vfolder)
    vf = access.vfolder
    allowed = {"owner": vf.permission, "ro": "ro"}.get(access.role, "rw")
    mode = item.mode or allowed
    if mode not in ("ro", "rw"):
        raise InvalidArgument("mode must be 'ro' or 'rw'")
    if mode == "rw" and allowed == "ro":
        raise Forbidden(f"the access of {owner.name!r} to vfolder {vf.alias!r} is read-only")
    export = _posix(vf, item.alias or vf.alias, mode, item.target)
    mounts = list(session.scalars(select(KernelMount).where(
        KernelMount.kernel_id == kernel_id)))
    for mount in mounts:
        if mount.alias == export.alias:
            if mount.vfolder_id == vf.id and mount.mode == mode \
                    and mount.target == export.container_path:
                return _describe(session, kernel)
            raise Conflict(f"kernel {kernel_id!r} already has a mount named "
                           f"{export.alias!r}", code="conflict")
        if mount.vfolder_id == vf.id:
            raise Conflict(f"vfolder {vf.alias!r} is already attached to kernel "
                           f"{kernel_id!r} as {mount.alias!r}", code="conflict")
        a, b = sorted([mount.target, export.container_path])
        if a == b or b.startswith(a.rstrip("/") + "/"):
            raise Conflict(f"{export.container_path} overlaps {mount.target} in kernel "
                           f"{kernel_id!r}", code="conflict")
    result = session.execute(update(Vfolder).where(
        Vfolder.id == vf.id, Vfolder.status.in_(EXPORTABLE)).values(status=MOUNTED))
    if result.rowcount != 1:
        raise Conflict(f"vfolder {vf.alias!r} is not ready to be exported",
                       code="vfolder-bad-state")
    row = KernelMount(kernel_id=kernel_id, alias=export.alias, mode=mode,
                      target=export.container_path, vfolder_id=vf.id)
    session.add(row)
    session.flush()
    return export, kernel.agent, row.id


def _attached(session: Session, kernel_id: str, mounts: list) -> dict[str, Any]:
    kernel = session.get(Kernel, kernel_id)
    if kernel is None:
        raise KernelNotFound(f"no kernel {kernel_id!r}")
    kernel.mounts_json = json.dumps(mounts)
    session.flush()
    return _describe(session, kernel)


def _mount_of(session: Session, who: Principal, kernel_id: str, alias: str
              ) -> tuple[str, int] | None:
    kernel = _visible(session, who, kernel_id)
    if kernel.status != "running":
        raise Conflict(f"kernel {kernel_id!r} is {kernel.status}", code="conflict")
    mount = session.scalars(select(KernelMount).where(
        KernelMount.kernel_id == kernel_id, KernelMount.alias == alias)).first()
    return None if mount is None else (kernel.agent, mount.id)


def _drop_mount(session: Session, mount_id: int) -> None:
    """Drops one mount of a kernel; its vfolder is ready again if no kernel uses it."""
    mount = session.get(KernelMount, mount_id)
    if mount is None:
        return
    vfid = mount.vfolder_id
    if vfid is not None:
        session.execute(select(Vfolder.id).where(Vfolder.id == vfid).with_for_update()).all()
    session.delete(mount)
    session.flush()
    if vfid is not None:
        session.execute(
            update(Vfolder).where(Vfolder.id == vfid, Vfolder.status == MOUNTED,
                                  ~exists().where(KernelMount.vfolder_id == Vfolder.id))
            .values(status=READY))


def _destroy_target(session: Session, who: Principal, kernel_id: str) -> str | None:
    kernel = session.get(Kernel, kernel_id)
    if kernel is None or kernel.status == "gone" or (
            kernel.owner_id != who.id and not who.is_admin):
        return None
    return kernel.agent


def _begin_destroy(session: Session, who: Principal, kernel_id: str) -> str | None:
    kernel = session.get(Kernel, kernel_id)
    if kernel is None:
        return None  # already gone: destroying twice is fine
    if kernel.owner_id != who.id and not who.is_admin:
        raise KernelNotFound(f"no kernel {kernel_id!r}")
    if kernel.status == "gone":  # died with its node; nothing is left on any agent
        session.delete(kernel)
        return None
    kernel.status = "destroying"
    return kernel.agent


def _forget(session: Session, kernel_id: str) -> None:
    """Drops a kernel's records and frees its vfolders that no other kernel uses."""
    vfids = list(session.scalars(select(KernelMount.vfolder_id).where(
        KernelMount.kernel_id == kernel_id, KernelMount.vfolder_id.is_not(None))))
    if vfids:
        # Lock the vfolder rows (in one global order) before looking at other kernels'
        # mounts: two kernels forgotten at once must not both see the other's mount.
        session.execute(select(Vfolder.id).where(Vfolder.id.in_(vfids))
                        .order_by(Vfolder.id).with_for_update()).all()
    session.execute(delete(KernelMount).where(KernelMount.kernel_id == kernel_id))
    session.execute(delete(Kernel).where(Kernel.id == kernel_id))
    if vfids:
        session.execute(
            update(Vfolder).where(Vfolder.id.in_(vfids), Vfolder.status == MOUNTED,
                                  ~exists().where(KernelMount.vfolder_id == Vfolder.id))
            .values(status=READY))
