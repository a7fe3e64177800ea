"""The manager's records (SQLAlchemy 2 declarative models).

Invariants kept by the schema itself, so that they hold under concurrent
requests and on both SQLite and PostgreSQL:

* an owner never has two vfolders of one alias unless one of them is purged
  (partial unique index ``uq_vfolders_owner_alias``);
* a vfolder's ``status`` is ``mounted`` exactly while ``kernel_mounts`` rows
  point at it; status changes are conditional UPDATEs, so the status row is
  the lock between "export" and "delete".
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    Uuid,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: lifecycle states (see DESIGN.md "Manager semantics").
READY, MOUNTED = "ready", "mounted"
DELETE_PENDING, DELETE_ONGOING, DELETE_COMPLETE, ERROR = (
    "delete-pending", "delete-ongoing", "delete-complete", "error")
STATES = (READY, MOUNTED, DELETE_PENDING, DELETE_ONGOING, DELETE_COMPLETE, ERROR)
EXPORTABLE = (READY, MOUNTED)


def now() -> datetime:
    return datetime.now(UTC)


def iso(value: datetime) -> str:
    """ISO 8601 in UTC; SQLite hands back naive datetimes, which are UTC here."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat()


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    uid: Mapped[int] = mapped_column(BigInteger, default=1000)
    gid: Mapped[int] = mapped_column(BigInteger, default=1000)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Token(Base):
    """An API token; only its SHA-256 is stored (tokens are 256-bit random)."""

    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Vfolder(Base):
    __tablename__ = "vfolders"
    __table_args__ = (
        Index("uq_vfolders_owner_alias", "owner_id", "alias", unique=True,
              sqlite_where=text("status != 'delete-complete'"),
              postgresql_where=text("status != 'delete-complete'")),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    alias: Mapped[str] = mapped_column(String(64))
    volume: Mapped[str] = mapped_column(String(64))
    #: the vfolder's directory inside the volume: its id in hex.
    path: Mapped[str] = mapped_column(String(255))
    usage_mode: Mapped[str] = mapped_column(String(16), default="general")
    #: the owner's own mount permission (ro|rw).
    permission: Mapped[str] = mapped_column(String(16), default="rw")
    quota_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    quota_files: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[str] = mapped_column(String(16), default=READY, index=True)
    status_message: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    modified_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class VfolderShare(Base):
    __tablename__ = "vfolder_shares"

    vfolder_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("vfolders.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True)
    #: ro | rw | rw-delete
    permission: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    account_url: Mapped[str] = mapped_column(String(255))
    container: Mapped[str] = mapped_column(String(63))
    prefix: Mapped[str] = mapped_column(String(1024), default="")
    #: shared (every user) | private (owner-listed users only)
    visibility: Mapped[str] = mapped_column(String(16), default="private")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class DatasetAccess(Base):
    __tablename__ = "dataset_access"

    dataset_id: Mapped[int] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True)


class Kernel(Base):
    __tablename__ = "kernels"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    agent: Mapped[str] = mapped_column(String(64))
    #: creating (export in flight) | running | destroying
    status: Mapped[str] = mapped_column(String(16), default="creating")
    #: hash of the create request, so that a retried create is recognised.
    request_hash: Mapped[str] = mapped_column(String(64))
    #: the agent's answer (OCI mounts), JSON text.
    mounts_json: Mapped[str] = mapped_column(Text, default="[]")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class KernelMount(Base):
    __tablename__ = "kernel_mounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kernel_id: Mapped[str] = mapped_column(
        ForeignKey("kernels.id", ondelete="CASCADE"), index=True)
    vfolder_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("vfolders.id"), index=True, nullable=True)
    dataset_id: Mapped[int | None] = mapped_column(
        ForeignKey("datasets.id"), nullable=True)
    alias: Mapped[str] = mapped_column(String(64))
    mode: Mapped[str] = mapped_column(String(4))
    target: Mapped[str] = mapped_column(String(1024))
    #: datasets: SHA-256 of the key in the agent's SAS renewal URL.
    renew_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)


class Agent(Base):
    """Agents registered through the API (config-file agents are not stored)."""

    __tablename__ = "agents"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    socket: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    url: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class AgentPresence(Base):
    """Agents the cluster has seen registered, so that a vanished one is shown as down.

    Written by the leader's reconcile loop; ``lease`` is the etcd lease (or
    the registration time) of the registration last seen, so that a new one
    (the agent came back) is noticed and reconciled once.
    """

    __tablename__ = "agent_presence"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    lease: Mapped[str] = mapped_column(String(64), default="")
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    #: when its kernels were last reconciled with its journal (None: never)
    reconciled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                           nullable=True)
