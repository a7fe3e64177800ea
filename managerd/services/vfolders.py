"""Vfolder records: create, list, info, rename, share, trash, restore, purge, quota.

Invariants:

* creation makes ``<volume mount>/<id hex>`` first and commits the row
  second; if the row cannot be committed the directory is removed again, so
  neither is left behind alone;
* a caller sees only vfolders it owns or that are shared with it (admins may
  reach any by id); an invisible vfolder is ``vfolder-not-found``, never
  ``forbidden``, so ids and aliases of others do not leak;
* rename, trash and purge are refused while a kernel exports the vfolder
  (status ``mounted``); the status changes are conditional UPDATEs.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

import trio
from sqlalchemy import exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from managerd.auth import Principal
from managerd.db.models import (
    DELETE_COMPLETE,
    DELETE_ONGOING,
    DELETE_PENDING,
    ERROR,
    MOUNTED,
    READY,
    KernelMount,
    User,
    Vfolder,
    VfolderShare,
    iso,
    now,
)
from managerd.db.session import Database
from managerd.errors import ApiError, Conflict, Forbidden, InvalidArgument, NotFound
from managerd.services.names import normalize, parse_id, validate_alias
from managerd.usage import read_usage
from managerd.volumes import StorageTimeout, VolumePool, remove_tree

log = logging.getLogger(__name__)

SHARE_PERMISSIONS = ("ro", "rw", "rw-delete")
USAGE_MODES = ("general", "data", "model")
TRASH = (DELETE_PENDING, DELETE_ONGOING)

#: roles: owner, admin (not owner), or the share permission.
MANAGE = ("owner", "admin")
TRASHERS = ("owner", "admin", "rw-delete")


class VfolderNotFound(NotFound):
    code = "vfolder-not-found"


@dataclass(frozen=True)
class Access:
    vfolder: Vfolder
    role: str
    owner_name: str


def resolve(session: Session, who: Principal, ref: str, *, purged: bool = False) -> Access:
    """The vfolder ``ref`` (id or alias) as seen by ``who``, with ``who``'s role.

    Aliases are looked up among the caller's own vfolders first, then among
    those shared with it; purged vfolders are found by id only when
    ``purged`` (for idempotent deletes).
    """
    vfid = parse_id(ref)
    if vfid is not None:
        row = session.execute(
            select(Vfolder, User.name).join(User, User.id == Vfolder.owner_id)
            .where(Vfolder.id == vfid)).first()
        if row is None or (row[0].status == DELETE_COMPLETE and not purged):
            raise VfolderNotFound(f"no vfolder {ref}")
        vf, owner_name = row
        role = _role(session, who, vf)
        if role is None:
            raise VfolderNotFound(f"no vfolder {ref}")
        return Access(vf, role, owner_name)
    ref = normalize(ref)
    live = Vfolder.status != DELETE_COMPLETE
    own = session.scalars(select(Vfolder).where(
        Vfolder.owner_id == who.id, Vfolder.alias == ref, live)).first()
    if own is not None:
        return Access(own, "owner", who.name)
    rows = session.execute(
        select(Vfolder, VfolderShare.permission, User.name)
        .join(VfolderShare, VfolderShare.vfolder_id == Vfolder.id)
        .join(User, User.id == Vfolder.owner_id)
        .where(VfolderShare.user_id == who.id, Vfolder.alias == ref, live)).all()
    if not rows:
        raise VfolderNotFound(f"no vfolder named {ref!r}")
    if len(rows) > 1:
        raise Conflict(f"several vfolders shared with you are named {ref!r}; use the id",
                       code="vfolder-ambiguous")
    vf, permission, owner_name = rows[0]
    return Access(vf, permission, owner_name)


def _role(session: Session, who: Principal, vf: Vfolder) -> str | None:
    if vf.owner_id == who.id:
        return "owner"
    permission = session.scalar(select(VfolderShare.permission).where(
        VfolderShare.vfolder_id == vf.id, VfolderShare.user_id == who.id))
    if permission is not None:
        return permission
    return "admin" if who.is_admin else None


def require(access: Access, allowed: tuple[str, ...], action: str) -> None:
    if access.role not in allowed:
        raise Forbidden(f"your access to vfolder {access.vfolder.alias!r} "
                        f"({access.role}) does not allow {action}")


def describe(session: Session, access: Access) -> dict[str, Any]:
    """The vfolder as the API shows it; owners and admins also see the shares."""
    out = _brief(access.vfolder, access.role, access.owner_name)
    vf = access.vfolder
    if access.role in MANAGE:
        rows = session.execute(
            select(User.name, VfolderShare.permission)
            .join(VfolderShare, VfolderShare.user_id == User.id)
            .where(VfolderShare.vfolder_id == vf.id).order_by(User.name)).all()
        out["shared_with"] = [{"user": n, "permission": p} for n, p in rows]
    return out


class VfolderService:
    def __init__(self, db: Database, volumes: VolumePool, default_quota: tuple[int, int]
                 = (0, 0)) -> None:
        self.db = db
        self.volumes = volumes
        self.default_quota = default_quota

    # -- create ----------------------------------------------------------------

    async def create(self, who: Principal, alias: str, *, volume: str | None = None,
                     usage_mode: str = "general", permission: str = "rw",
                     dotfolder: bool = False) -> dict[str, Any]:
        alias = validate_alias(alias, dotfolder=dotfolder)
        if usage_mode not in USAGE_MODES:
            raise InvalidArgument(f"usage_mode must be one of {', '.join(USAGE_MODES)}")
        if permission not in ("ro", "rw"):
            raise InvalidArgument("permission must be 'ro' or 'rw'")
        await self.db.read(_check_alias_free, who.id, alias)
        volume_name, mount = await self.volumes.choose(volume)
        vfid = uuid.uuid4()
        directory = mount / vfid.hex
        await self.volumes.make_dir(volume_name, directory)
        try:
            return await self.db.run(_insert, who, vfid, alias, volume_name, usage_mode,
                                     permission, self.default_quota)
        except BaseException:
            with trio.CancelScope(shield=True):  # also when the request is cancelled
                try:
                    await self.volumes.remove_dir(volume_name, directory)
                except ApiError as exc:
                    log.error("vfolder directory %s left behind: %s", directory, exc.message)
            raise

    # -- reads -----------------------------------------------------------------

    async def list(self, who: Principal, *, everyone: bool = False,
                   trash: bool = False) -> list[dict[str, Any]]:
        if everyone and not who.is_admin:
            raise Forbidden("only admins may list every vfolder")
        return await self.db.read(_list, who, everyone, trash)

    async def info(self, who: Principal, ref: str) -> dict[str, Any]:
        out, volume, path = await self.db.read(_info, who, ref)
        try:
            out["usage"] = await self._usage(volume, path)
        except ApiError as exc:
            out["usage"] = None
            out["usage_error"] = exc.body()["error"]
        return out

    async def usage(self, who: Principal, ref: str) -> dict[str, Any]:
        out, volume, path = await self.db.read(_info, who, ref)
        if out["status"] not in (READY, MOUNTED, DELETE_PENDING):
            raise Conflict(f"vfolder is {out['status']}; it has no usage", code="vfolder-bad-state")
        usage = await self._usage(volume, path)
        return {"id": out["id"], **usage}

    async def _usage(self, volume: str, path: str) -> dict[str, int]:
        directory = await self.volumes.vfolder_dir(volume, path)
        used_bytes, files = await self.volumes.storage(read_usage, directory,
                                                       what="reading usage", volume=volume)
        return {"bytes": used_bytes, "files": files}

    # -- changes ---------------------------------------------------------------

    async def rename(self, who: Principal, ref: str, new_alias: str,
                     dotfolder: bool = False) -> dict[str, Any]:
        new_alias = validate_alias(new_alias, dotfolder=dotfolder)
        return await self.db.run(_rename, who, ref, new_alias)

    async def share(self, who: Principal, ref: str, user: str, permission: str) -> dict:
        if permission not in SHARE_PERMISSIONS:
            raise InvalidArgument(f"permission must be one of {', '.join(SHARE_PERMISSIONS)}")
        return await self.db.run(_share, who, ref, user, permission)

    async def unshare(self, who: Principal, ref: str, user: str) -> None:
        await self.db.run(_unshare, who, ref, user)

    async def set_quota(self, who: Principal, ref: str, quota_bytes: int | None,
                        quota_files: int | None) -> dict[str, Any]:
        if not who.is_admin:
            raise Forbidden("only admins set quotas")
        for value in (quota_bytes, quota_files):
            if value is not None and value < 0:
                raise InvalidArgument("quotas must be >= 0 (0 means unlimited)")
        return await self.db.run(_set_quota, who, ref, quota_bytes, quota_files)

    async def trash(self, who: Principal, ref: str) -> None:
        await self.db.run(_trash, who, ref)

    async def restore(self, who: Principal, ref: str) -> dict[str, Any]:
        return await self.db.run(_restore, who, ref)

    async def purge(self, who: Principal, ref: str) -> bool:
        """Removes a trashed vfolder's directory; the row stays as ``delete-complete``.

        Returns False when the removal outlasts the storage timeout (a large
        tree, slow storage): it goes on in its thread, which records the
        outcome itself (``delete-complete`` or ``error``); meanwhile the
        vfolder is ``delete-ongoing``.
        """
        target = await self.db.run(_begin_purge, who, ref)
        if target is None:
            return True
        vfid, volume, path = target
        try:
            directory = await self.volumes.vfolder_dir(volume, path)
        except ApiError as exc:
            await self.db.run(_set_status, vfid, DELETE_ONGOING, ERROR,
                              f"purge failed: {exc.message}")
            raise

        def remove() -> None:  # runs in a worker thread, possibly beyond the request
            try:
                remove_tree(directory)
            except OSError as exc:
                self.db.call(_set_status, vfid, DELETE_ONGOING, ERROR,
                             f"purge failed: {exc.strerror or exc}")
                raise
            self.db.call(_set_status, vfid, DELETE_ONGOING, DELETE_COMPLETE, "")

        try:
            await self.volumes.storage(remove, what="removing the vfolder directory",
                                       volume=volume)
        except StorageTimeout:
            log.warning("purge of vfolder %s continues in the background", vfid)
            return False
        return True


# -- units of work (run in a worker thread, one transaction each) ---------------

def _check_alias_free(session: Session, owner_id: int, alias: str) -> None:
    status = session.scalar(select(Vfolder.status).where(
        Vfolder.owner_id == owner_id, Vfolder.alias == alias,
        Vfolder.status != DELETE_COMPLETE))
    if status is not None:
        raise _exists(alias, status)


def _exists(alias: str, status: str | None = None) -> Conflict:
    extra = "; it is in the trash: restore or purge it" if status in TRASH else ""
    return Conflict(f"you already have a vfolder named {alias!r}{extra}", code="vfolder-exists")


def _insert(session: Session, who: Principal, vfid: uuid.UUID, alias: str, volume: str,
            usage_mode: str, permission: str, quota: tuple[int, int]) -> dict[str, Any]:
    vf = Vfolder(id=vfid, owner_id=who.id, alias=alias, volume=volume, path=vfid.hex,
                 usage_mode=usage_mode, permission=permission, quota_bytes=quota[0],
                 quota_files=quota[1], status=READY, status_message="")
    session.add(vf)
    try:
        session.flush()
    except IntegrityError:
        raise _exists(alias) from None
    return describe(session, Access(vf, "owner", who.name))


def _list(session: Session, who: Principal, everyone: bool, trash: bool) -> list[dict]:
    """Plain column rows (no ORM objects): listing stays cheap for hundreds of vfolders."""
    states = TRASH if trash else (READY, MOUNTED, ERROR)
    query = (select(*_COLUMNS, User.name.label("owner_name"),
                    VfolderShare.permission.label("share"))
             .join(User, User.id == Vfolder.owner_id)
             .outerjoin(VfolderShare, (VfolderShare.vfolder_id == Vfolder.id)
                        & (VfolderShare.user_id == who.id))
             .where(Vfolder.status.in_(states)))
    if not everyone:
        query = query.where((Vfolder.owner_id == who.id) | (VfolderShare.user_id == who.id))
    out = []
    for row in session.execute(query.order_by(Vfolder.alias, Vfolder.created_at)):
        role = "owner" if row.owner_id == who.id else row.share or "admin"
        out.append(_brief(row, role, row.owner_name))
    return out


_COLUMNS = (Vfolder.id, Vfolder.owner_id, Vfolder.alias, Vfolder.volume, Vfolder.path,
            Vfolder.usage_mode, Vfolder.permission, Vfolder.quota_bytes, Vfolder.quota_files,
            Vfolder.status, Vfolder.status_message, Vfolder.created_at, Vfolder.modified_at)


def _brief(vf: Any, role: str, owner_name: str) -> dict[str, Any]:
    return {
        "id": str(vf.id), "alias": vf.alias, "owner": owner_name, "access": role,
        "volume": vf.volume, "path": vf.path, "usage_mode": vf.usage_mode,
        "permission": vf.permission, "quota_bytes": vf.quota_bytes,
        "quota_files": vf.quota_files, "status": vf.status,
        "status_message": vf.status_message, "created_at": iso(vf.created_at),
        "modified_at": iso(vf.modified_at),
    }


def _info(session: Session, who: Principal, ref: str) -> tuple[dict, str, str]:
    access = resolve(session, who, ref)
    return describe(session, access), access.vfolder.volume, access.vfolder.path


def _rename(session: Session, who: Principal, ref: str, new_alias: str) -> dict[str, Any]:
    access = resolve(session, who, ref)
    require(access, MANAGE, "renaming it")
    vf = access.vfolder
    if vf.alias == new_alias:
        return describe(session, access)
    _check_alias_free(session, vf.owner_id, new_alias)
    result = session.execute(
        update(Vfolder).where(Vfolder.id == vf.id, Vfolder.status.in_((READY, ERROR)))
        .values(alias=new_alias, modified_at=now()))
    if result.rowcount != 1:
        raise _state_conflict(session, vf.id, "renamed")
    try:
        session.flush()
    except IntegrityError:
        raise _exists(new_alias) from None
    session.refresh(vf)
    return describe(session, access)


def _state_conflict(session: Session, vfid: uuid.UUID, action: str) -> ApiError:
    status = session.scalar(select(Vfolder.status).where(Vfolder.id == vfid))
    if status == MOUNTED:
        return Conflict(f"vfolder is exported to a running kernel and cannot be {action}",
                        code="vfolder-in-use")
    return Conflict(f"vfolder is {status} and cannot be {action}", code="vfolder-bad-state")


def _user_id(session: Session, name: str) -> int:
    uid = session.scalar(select(User.id).where(User.name == name))
    if uid is None:
        raise NotFound(f"no user named {name!r}", code="user-not-found")
    return uid


def _share(session: Session, who: Principal, ref: str, user: str, permission: str) -> dict:
    access = resolve(session, who, ref)
    require(access, MANAGE, "sharing it")
    if access.vfolder.status not in (READY, MOUNTED, ERROR):
        raise Conflict(f"vfolder is {access.vfolder.status}; it cannot be shared",
                       code="vfolder-bad-state")
    user_id = _user_id(session, user)
    if user_id == access.vfolder.owner_id:
        raise InvalidArgument("a vfolder cannot be shared with its owner")
    share = session.get(VfolderShare, (access.vfolder.id, user_id))
    if share is None:
        session.add(VfolderShare(vfolder_id=access.vfolder.id, user_id=user_id,
                                 permission=permission))
    else:
        share.permission = permission
    session.flush()
    return describe(session, access)


def _unshare(session: Session, who: Principal, ref: str, user: str) -> None:
    access = resolve(session, who, ref)
    user_id = _user_id(session, user)
    if not (access.role in MANAGE or user_id == who.id):
        raise Forbidden("only the owner may remove someone else's share")
    share = session.get(VfolderShare, (access.vfolder.id, user_id))
    if share is not None:
        session.delete(share)


def _set_quota(session: Session, who: Principal, ref: str, quota_bytes: int | None,
               quota_files: int | None) -> dict[str, Any]:
    access = resolve(session, who, ref)
    values: dict[str, Any] = {"modified_at": now()}
    if quota_bytes is not None:
        values["quota_bytes"] = quota_bytes
    if quota_files is not None:
        values["quota_files"] = quota_files
    session.execute(update(Vfolder).where(Vfolder.id == access.vfolder.id).values(**values))
    session.refresh(access.vfolder)
    return describe(session, access)


def _trash(session: Session, who: Principal, ref: str) -> None:
    access = resolve(session, who, ref, purged=True)
    require(access, TRASHERS, "deleting it")
    vf = access.vfolder
    if vf.status in (*TRASH, DELETE_COMPLETE):
        return
    in_use = session.scalar(select(exists().where(KernelMount.vfolder_id == vf.id)))
    result = session.execute(
        update(Vfolder).where(Vfolder.id == vf.id, Vfolder.status.in_((READY, ERROR)))
        .values(status=DELETE_PENDING, modified_at=now()))
    if in_use or result.rowcount != 1:
        raise _state_conflict(session, vf.id, "deleted")


def _restore(session: Session, who: Principal, ref: str) -> dict[str, Any]:
    access = resolve(session, who, ref)
    require(access, TRASHERS, "restoring it")
    result = session.execute(
        update(Vfolder).where(Vfolder.id == access.vfolder.id,
                              Vfolder.status == DELETE_PENDING)
        .values(status=READY, modified_at=now()))
    if result.rowcount != 1 and access.vfolder.status != READY:
        raise _state_conflict(session, access.vfolder.id, "restored")
    session.refresh(access.vfolder)
    return describe(session, access)


def _begin_purge(session: Session, who: Principal, ref: str) -> tuple | None:
    access = resolve(session, who, ref, purged=True)
    require(access, MANAGE, "purging it")
    vf = access.vfolder
    if vf.status == DELETE_COMPLETE:
        return None
    result = session.execute(
        update(Vfolder).where(Vfolder.id == vf.id,
                              Vfolder.status.in_((DELETE_PENDING, ERROR, DELETE_ONGOING)))
        .values(status=DELETE_ONGOING, modified_at=now()))
    if result.rowcount != 1:
        if vf.status in (READY, MOUNTED):
            raise Conflict("move the vfolder to the trash before purging it",
                           code="vfolder-bad-state")
        raise _state_conflict(session, vf.id, "purged")
    return vf.id, vf.volume, vf.path


def _set_status(session: Session, vfid: uuid.UUID, expected: str, status: str,
                message: str) -> None:
    session.execute(update(Vfolder).where(Vfolder.id == vfid, Vfolder.status == expected)
                    .values(status=status, status_message=message, modified_at=now()))
