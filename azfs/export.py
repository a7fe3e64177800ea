"""The export request: what the manager asks an agent to present to one kernel.

This is the wire contract between managerd and agentd (``PUT
/v1/kernels/{kernel_id}`` on the agent's control socket), validated on both
sides.  The answer is a list of OCI ``mounts`` entries that a container
runtime applies.
"""

from __future__ import annotations

import posixpath
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: kernel ids and aliases become path components in the FUSE namespace.
KERNEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
CONTAINER_HOME = "/home/work"


def validate_component(value: str, what: str) -> str:
    """A single path component: no '/', NUL, control chars, '.', '..'; 1-64 chars."""
    if not 1 <= len(value) <= 64:
        raise ValueError(f"{what} must be 1-64 characters")
    if value in (".", ".."):
        raise ValueError(f"{what} must not be '.' or '..'")
    if "/" in value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{what} must not contain '/' or control characters")
    return value


def resolve_target(target: str | None, alias: str) -> str:
    """The container path of a mount: default /home/work/<alias>; relative under /home/work."""
    if not target:
        return f"{CONTAINER_HOME}/{alias}"
    if "\0" in target:
        raise ValueError("target must not contain NUL")
    path = target if target.startswith("/") else f"{CONTAINER_HOME}/{target}"
    norm = posixpath.normpath(path)
    if norm == "/" or ".." in norm.split("/"):
        raise ValueError(f"target {target!r} is not a usable container path")
    return norm


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSource(_Strict):
    """A blob container or prefix; the SAS comes from ``sas_url`` or ``sas``."""

    url: str = Field(description="container or prefix URL without query, "
                                 "e.g. https://ACCOUNT.blob.core.windows.net/CONTAINER/PREFIX")
    sas: str | None = Field(default=None, description="read-only SAS query string")
    sas_url: str | None = Field(default=None,
                                description="URL the agent GETs to obtain a fresh SAS")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/?#]+/[^?#]+$", value):
            raise ValueError("url must be http(s)://HOST/ACCOUNT-OR-CONTAINER[/...] without query")
        return value


class VfolderExport(_Strict):
    alias: str
    kind: Literal["posix", "blob"] = "posix"
    mode: Literal["ro", "rw"] = "rw"
    #: posix: host volume name and the vfolder's path inside it (uuid hex path)
    volume: str | None = None
    path: str | None = None
    #: blob: the dataset source
    dataset: DatasetSource | None = None
    quota_bytes: int = Field(default=0, ge=0)
    quota_files: int = Field(default=0, ge=0)
    #: container path; default /home/work/<alias>, relative paths under /home/work
    target: str | None = None
    vfolder_id: str | None = None

    @field_validator("alias")
    @classmethod
    def _alias(cls, value: str) -> str:
        return validate_component(value, "alias")

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = [p for p in value.split("/") if p]
        if not parts or value.startswith("/") or any(p in (".", "..") for p in parts) \
                or "\0" in value:
            raise ValueError("path must be a relative path inside the volume without '..'")
        return "/".join(parts)

    @model_validator(mode="after")
    def _kind_fields(self) -> VfolderExport:
        if self.kind == "posix" and (not self.volume or not self.path or self.dataset):
            raise ValueError("posix exports need 'volume' and 'path' (and no 'dataset')")
        if self.kind == "blob":
            if not self.dataset or self.volume or self.path:
                raise ValueError("blob exports need 'dataset' (and no 'volume'/'path')")
            if self.mode != "ro":
                raise ValueError("blob exports are read-only: mode must be 'ro'")
        resolve_target(self.target, self.alias)
        return self

    @property
    def container_path(self) -> str:
        return resolve_target(self.target, self.alias)


class ExportRequest(_Strict):
    uid: int = Field(default=1000, ge=0, le=2**32 - 2)
    gid: int = Field(default=1000, ge=0, le=2**32 - 2)
    vfolders: list[VfolderExport] = Field(default_factory=list, max_length=256)

    @model_validator(mode="after")
    def _unique(self) -> ExportRequest:
        aliases = [v.alias for v in self.vfolders]
        dup = {a for a in aliases if aliases.count(a) > 1}
        if dup:
            raise ValueError(f"duplicate alias in one kernel: {sorted(dup)[0]}")
        targets = sorted(v.container_path for v in self.vfolders)
        for a, b in zip(targets, targets[1:], strict=False):
            if b == a or b.startswith(a.rstrip("/") + "/"):
                raise ValueError(f"overlapping mount targets: {a} and {b}")
        return self


def validate_kernel_id(kernel_id: str) -> str:
    if not KERNEL_ID_RE.match(kernel_id):
        raise ValueError("kernel id must be 1-128 of [A-Za-z0-9_.-], starting alphanumeric")
    return kernel_id


class OciMount(BaseModel):
    """One entry of an OCI runtime spec's ``mounts``."""

    destination: str
    type: Literal["bind"] = "bind"
    source: str
    options: list[str]


class ExportResponse(BaseModel):
    kernel_id: str
    mounts: list[OciMount]
