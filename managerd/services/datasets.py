"""Datasets: blob containers or prefixes registered by admins, read through SAS.

A dataset is ``shared`` (every user may read it) or ``private`` (admins and
the listed users).  A dataset a caller may not read is ``dataset-not-found``.
SAS tokens are read-only and short-lived; a container-scoped token reaches
the whole container, so a private dataset that must stay apart from others
belongs in a container of its own (or is read blob by blob).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from typing import Any

import trio
from sqlalchemy import delete, exists, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from azfs.export import DatasetSource
from azfs.secret import Secret
from managerd import sas
from managerd.auth import Principal
from managerd.db.models import Dataset, DatasetAccess, KernelMount, User, iso
from managerd.db.session import Database
from managerd.errors import Conflict, Forbidden, InvalidArgument, NotFound, Unavailable
from managerd.services.names import validate_name

ACCOUNT_URL_RE = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[a-z0-9]{3,24})?/?$")
CONTAINER_RE = re.compile(r"^[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]$")


class DatasetNotFound(NotFound):
    code = "dataset-not-found"


def normalize_prefix(prefix: str) -> str:
    """'' or 'a/b/' (always a trailing '/'); no '..', no control characters."""
    if not prefix:
        return ""
    if len(prefix) > 1024 or any(ord(c) < 32 or ord(c) == 127 for c in prefix) \
            or prefix.startswith("/"):
        raise InvalidArgument("prefix must be a relative blob name prefix of at most 1024 chars")
    parts = [p for p in prefix.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise InvalidArgument("prefix must not contain '.' or '..' components")
    return "/".join(parts) + "/" if parts else ""


def dataset_dict(ds: Dataset, users: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": ds.name, "account_url": ds.account_url, "container": ds.container,
        "prefix": ds.prefix, "visibility": ds.visibility, "url": source_url(ds),
        "created_at": iso(ds.created_at)}
    if users is not None:
        out["users"] = users
    return out


def source_url(ds: Dataset) -> str:
    return f"{ds.account_url.rstrip('/')}/{ds.container}" + (
        f"/{ds.prefix.rstrip('/')}" if ds.prefix else "")


def readable(session: Session, who: Principal, name: str) -> Dataset:
    ds = session.scalars(select(Dataset).where(Dataset.name == name)).first()
    if ds is None:
        raise DatasetNotFound(f"no dataset named {name!r}")
    if who.is_admin or ds.visibility == "shared":
        return ds
    allowed = session.scalar(select(exists().where(
        DatasetAccess.dataset_id == ds.id, DatasetAccess.user_id == who.id)))
    if not allowed:
        raise DatasetNotFound(f"no dataset named {name!r}")
    return ds


def _user_ids(session: Session, names: list[str]) -> list[int]:
    ids = []
    for name in names:
        uid = session.scalar(select(User.id).where(User.name == name))
        if uid is None:
            raise NotFound(f"no user named {name!r}", code="user-not-found")
        ids.append(uid)
    return ids


def _users_of(session: Session, ds: Dataset) -> list[str]:
    return list(session.scalars(
        select(User.name).join(DatasetAccess, DatasetAccess.user_id == User.id)
        .where(DatasetAccess.dataset_id == ds.id).order_by(User.name)))


class DatasetService:
    def __init__(self, db: Database, account_keys: Mapping[str, Secret], sas_ttl: int,
                 sas_max_ttl: int) -> None:
        self.db = db
        self.account_keys = account_keys
        self.sas_ttl = sas_ttl
        self.sas_max_ttl = sas_max_ttl

    async def register(self, who: Principal, name: str, account_url: str, container: str,
                       prefix: str, visibility: str, users: list[str]) -> dict[str, Any]:
        if not who.is_admin:
            raise Forbidden("only admins register datasets")
        validate_name(name, "dataset name")
        if not ACCOUNT_URL_RE.match(account_url):
            raise InvalidArgument("account_url must be http(s)://HOST[:PORT][/ACCOUNT] "
                                  "without query")
        if not CONTAINER_RE.match(container):
            raise InvalidArgument("container must be 3-63 of [a-z0-9-] (Azure naming rules)")
        prefix = normalize_prefix(prefix)
        if visibility not in ("shared", "private"):
            raise InvalidArgument("visibility must be 'shared' or 'private'")

        def work(session: Session) -> dict[str, Any]:
            ds = Dataset(name=name, account_url=account_url.rstrip("/"), container=container,
                         prefix=prefix, visibility=visibility)
            session.add(ds)
            try:
                session.flush()
            except IntegrityError:
                raise Conflict(f"a dataset named {name!r} exists",
                               code="dataset-exists") from None
            for uid in _user_ids(session, sorted(set(users))):
                session.add(DatasetAccess(dataset_id=ds.id, user_id=uid))
            return dataset_dict(ds, sorted(set(users)))

        return await self.db.run(work)

    async def list(self, who: Principal) -> list[dict[str, Any]]:
        def work(session: Session) -> list[dict[str, Any]]:
            query = select(Dataset).order_by(Dataset.name)
            if not who.is_admin:
                query = query.where((Dataset.visibility == "shared") | exists().where(
                    DatasetAccess.dataset_id == Dataset.id, DatasetAccess.user_id == who.id))
            return [dataset_dict(ds) for ds in session.scalars(query)]

        return await self.db.read(work)

    async def info(self, who: Principal, name: str) -> dict[str, Any]:
        def work(session: Session) -> dict[str, Any]:
            ds = readable(session, who, name)
            return dataset_dict(ds, _users_of(session, ds) if who.is_admin else None)

        return await self.db.read(work)

    async def set_access(self, who: Principal, name: str, users: list[str],
                         grant: bool) -> dict[str, Any]:
        if not who.is_admin:
            raise Forbidden("only admins change who may read a dataset")

        def work(session: Session) -> dict[str, Any]:
            ds = readable(session, who, name)
            for uid in _user_ids(session, sorted(set(users))):
                current = session.get(DatasetAccess, (ds.id, uid))
                if grant and current is None:
                    session.add(DatasetAccess(dataset_id=ds.id, user_id=uid))
                elif not grant and current is not None:
                    session.delete(current)
            session.flush()
            return dataset_dict(ds, _users_of(session, ds))

        return await self.db.run(work)

    async def remove(self, who: Principal, name: str) -> None:
        if not who.is_admin:
            raise Forbidden("only admins remove datasets")

        def work(session: Session) -> None:
            ds = session.scalars(select(Dataset).where(Dataset.name == name)).first()
            if ds is None:
                return
            if session.scalar(select(exists().where(KernelMount.dataset_id == ds.id))):
                raise Conflict("a running kernel reads this dataset", code="dataset-in-use")
            session.execute(delete(DatasetAccess).where(DatasetAccess.dataset_id == ds.id))
            session.delete(ds)

        await self.db.run(work)

    # -- SAS -------------------------------------------------------------------

    async def issue_sas(self, who: Principal, name: str, ttl: int | None = None,
                        blob: str | None = None) -> dict[str, Any]:
        ds = await self.db.read(readable, who, name)
        issued = await trio.to_thread.run_sync(self._sign, ds, ttl, blob)
        return {"dataset": ds.name, "scope": issued.scope, "sas": issued.sas,
                "url": issued.url, "expires_at": issued.expires_at.isoformat()}

    def source(self, ds: Dataset, sas_url: str | None = None) -> DatasetSource:
        """The export form of a dataset: a fresh container SAS, and where to renew it."""
        issued = self._sign(ds, self.sas_max_ttl, None)
        return DatasetSource(url=source_url(ds), sas=issued.sas, sas_url=sas_url)

    def renewal(self, ds: Dataset) -> dict[str, Any]:
        """The answer to an agent's SAS renewal: a container SAS of the default lifetime."""
        issued = self._sign(ds, None, None)
        return {"sas": issued.sas, "expires_at": issued.expires_at.isoformat()}

    def _sign(self, ds: Dataset, ttl: int | None, blob: str | None) -> sas.IssuedSas:
        ttl = min(self.sas_ttl, self.sas_max_ttl) if ttl is None else ttl
        if not 60 <= ttl <= self.sas_max_ttl:
            raise InvalidArgument(f"ttl must be 60-{self.sas_max_ttl} seconds")
        account = sas.account_name(ds.account_url)
        key = self.account_keys.get(account)
        if key is None:
            raise Unavailable(f"no key is configured for storage account {account!r}",
                              code="sas-unavailable")
        if blob is None:
            return sas.container_sas(ds.account_url, ds.container, key, ttl)
        if not blob or blob.startswith("/") or len(blob) > 1024 \
                or any(ord(c) < 32 for c in blob) \
                or posixpath.normpath(blob) != blob or blob.split("/")[0] == "..":
            raise InvalidArgument("blob must be a relative blob name inside the dataset")
        return sas.blob_sas(ds.account_url, ds.container, ds.prefix + blob, key, ttl)
