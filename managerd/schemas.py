"""Response shapes of the REST API, published in the OpenAPI document.

Services build plain dicts; these models only document and check what
leaves the manager.  Optional fields absent from an answer (``shared_with``
for a non-owner, ``usage_error`` when usage is known) stay absent.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Status = Literal["ready", "mounted", "delete-pending", "delete-ongoing", "delete-complete",
                 "error"]


class Share(BaseModel):
    user: str
    permission: Literal["ro", "rw", "rw-delete"]


class Usage(BaseModel):
    bytes: int = Field(ge=0)
    files: int = Field(ge=0)


class ErrorDetail(BaseModel):
    code: str = Field(description="stable, machine-readable")
    message: str = Field(description="for humans")


class ErrorBody(BaseModel):
    error: ErrorDetail


class VfolderOut(BaseModel):
    id: str
    alias: str
    owner: str
    access: str = Field(description="the caller's access: owner, admin, ro, rw, rw-delete")
    volume: str
    path: str = Field(description="directory inside the host volume")
    usage_mode: str
    permission: Literal["ro", "rw"] = Field(description="the owner's mount permission")
    quota_bytes: int = Field(description="0: unlimited")
    quota_files: int = Field(description="0: unlimited")
    status: Status
    status_message: str
    created_at: str
    modified_at: str
    shared_with: list[Share] | None = Field(default=None,
                                            description="owners and admins only")


class VfolderInfo(VfolderOut):
    usage: Usage | None = Field(default=None, description="null when it cannot be known")
    usage_error: ErrorDetail | None = None


class UsageOut(Usage):
    id: str


class UserOut(BaseModel):
    name: str
    admin: bool
    uid: int
    gid: int
    created_at: str


class UserWithToken(UserOut):
    token: str = Field(description="shown once; only its hash is stored")


class TokenOut(BaseModel):
    user: str
    label: str
    token: str = Field(description="shown once; only its hash is stored")


class DatasetOut(BaseModel):
    name: str
    account_url: str
    container: str
    prefix: str
    visibility: Literal["shared", "private"]
    url: str
    created_at: str
    users: list[str] | None = Field(default=None, description="admins only")


class SasOut(BaseModel):
    dataset: str
    scope: Literal["container", "blob"]
    sas: str = Field(description="query string of a read-only SAS")
    url: str
    expires_at: str


class RenewedSas(BaseModel):
    sas: str
    expires_at: str


class KernelMountOut(BaseModel):
    alias: str
    kind: Literal["posix", "blob"]
    mode: Literal["ro", "rw"]
    target: str
    vfolder_id: str | None


class KernelOut(BaseModel):
    kernel_id: str
    owner: str
    agent: str
    status: Literal["creating", "running", "destroying", "gone"] = Field(
        description="gone: its node came back without it (its vfolders are free again)")
    created_at: str
    vfolders: list[KernelMountOut]
    mounts: list[dict[str, Any]] = Field(description="OCI bind mounts the agent answered")


class AgentOut(BaseModel):
    name: str
    socket: str | None
    url: str | None
    expires_at: str | None
    source: Literal["api", "config", "etcd"]
    state: Literal["up", "down", "unknown"] = Field(
        description="down: seen before (or has kernels) but no longer registered")
    last_seen: str | None = None


class VolumeOut(BaseModel):
    name: str
    free_bytes: int | None
    error: ErrorDetail | None = None


class Health(BaseModel):
    status: str
    version: str
    leader: bool | None = Field(default=None,
                                description="this manager runs the cluster's background work")
