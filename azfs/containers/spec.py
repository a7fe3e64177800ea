"""What one kernel container looks like, independent of the runtime that runs it.

A :class:`KernelSpec` is built from the agent's export answer (OCI ``mounts``
entries) plus the process to run; :mod:`azfs.containers.runc` turns it into
an OCI bundle and :mod:`azfs.containers.docker` into ``docker run``
arguments, so both runtimes present exactly the same mounts.

Invariants checked here, before any runtime is touched:
* every bind destination is an absolute, normalised container path other
  than ``/`` and no two binds share a destination;
* ``/home/work`` itself is the kernel's home: the agent's kernel directory
  when the export binds it (then a runtime's scratch directory is not used),
  else the scratch directory (when given); it is mounted first and the
  export's binds follow, parents before children, so a bind is never hidden
  under a later one;
* a bind the export marks ``rslave`` keeps receiving the host's mounts below
  its source (that is how the agent re-binds vfolders into a running kernel
  after a FUSE restart, and attaches or detaches them).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from azfs.errors import InvalidArgument
from azfs.export import CONTAINER_HOME, ExportResponse, OciMount

#: runc accepts container ids of ``[\w+-.]``; kernel ids are a subset of that.
CONTAINER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
Network = Literal["none", "host"]
#: mount propagation a bind may ask for (OCI option, Docker ``bind-propagation``)
PROPAGATIONS = ("rslave", "slave", "rprivate", "private")


def container_path(value: str, what: str = "destination") -> str:
    """An absolute, normalised container path that is not ``/``."""
    if not value.startswith("/") or "\0" in value:
        raise InvalidArgument(f"{what} {value!r} must be an absolute container path")
    if ".." in value.split("/"):
        raise InvalidArgument(f"{what} {value!r} must not contain '..'")
    norm = posixpath.normpath(value)
    if norm == "/":
        raise InvalidArgument(f"{what} must not be '/'")
    return norm


@dataclass(frozen=True)
class BindMount:
    """A host path bound into the container, read-only or read-write."""

    source: Path
    destination: str
    readonly: bool
    #: None: the runtime's default (private); "rslave": host mounts below reach it
    propagation: str | None = None

    def __post_init__(self) -> None:
        if not Path(self.source).is_absolute():
            raise InvalidArgument(f"bind source {str(self.source)!r} must be an absolute path")
        if self.propagation is not None and self.propagation not in PROPAGATIONS:
            raise InvalidArgument(f"bind propagation {self.propagation!r} is not one of "
                                  f"{', '.join(PROPAGATIONS)}")
        object.__setattr__(self, "source", Path(self.source))
        object.__setattr__(self, "destination", container_path(self.destination))

    @classmethod
    def from_oci(cls, mount: OciMount) -> BindMount:
        """One entry of an export answer; only ``bind`` with ``ro`` or ``rw`` is accepted."""
        if mount.type != "bind":
            raise InvalidArgument(f"mount type {mount.type!r} is not a bind mount")
        modes = {"ro", "rw"} & set(mount.options)
        if len(modes) != 1:
            raise InvalidArgument(
                f"mount {mount.destination!r} must say exactly one of 'ro' or 'rw'")
        propagation = [o for o in mount.options if o in PROPAGATIONS]
        if len(propagation) > 1:
            raise InvalidArgument(f"mount {mount.destination!r} names two propagations")
        return cls(Path(mount.source), mount.destination, readonly="ro" in modes,
                   propagation=propagation[0] if propagation else None)


@dataclass(frozen=True)
class KernelSpec:
    """One kernel's container: process, identity, scratch home and binds."""

    kernel_id: str
    args: tuple[str, ...]
    uid: int = 1000
    gid: int = 1000
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str = CONTAINER_HOME
    #: host directory shown as /home/work; None leaves the rootfs' own /home/work
    scratch_dir: Path | None = None
    binds: tuple[BindMount, ...] = ()
    #: "none": a network namespace of its own (loopback only); "host": the node's
    network: Network = "none"
    readonly_rootfs: bool = False

    def __post_init__(self) -> None:
        if not CONTAINER_ID_RE.match(self.kernel_id):
            raise InvalidArgument(
                "kernel id must be 1-128 of [A-Za-z0-9_.+-], starting alphanumeric")
        if not self.args or not all(isinstance(a, str) and a for a in self.args):
            raise InvalidArgument("args must be a non-empty list of non-empty strings")
        object.__setattr__(self, "args", tuple(self.args))
        for what, value in (("uid", self.uid), ("gid", self.gid)):
            if not 0 <= value <= 2**32 - 2:
                raise InvalidArgument(f"{what} {value} is out of range")
        for key, value in self.env.items():
            if not key or "=" in key or "\0" in key or "\0" in value:
                raise InvalidArgument(f"bad environment variable name or value: {key!r}")
        object.__setattr__(self, "cwd", container_path(self.cwd, "cwd"))
        if self.network not in ("none", "host"):
            raise InvalidArgument(f"network must be 'none' or 'host', not {self.network!r}")
        if self.scratch_dir is not None:
            scratch = Path(self.scratch_dir)
            if not scratch.is_absolute():
                raise InvalidArgument("scratch_dir must be an absolute path")
            object.__setattr__(self, "scratch_dir", scratch)
        seen: set[str] = set()
        for bind in self.binds:
            if bind.destination in seen:
                raise InvalidArgument(f"two binds at {bind.destination!r}")
            if bind.destination == CONTAINER_HOME and self.scratch_dir is not None:
                raise InvalidArgument(f"{CONTAINER_HOME} is the scratch dir; bind below it")
            seen.add(bind.destination)
        object.__setattr__(self, "binds", tuple(self.binds))

    @classmethod
    def from_export(cls, export: ExportResponse, args: Sequence[str], *, uid: int = 1000,
                    gid: int = 1000, scratch_dir: Path | None = None,
                    env: Mapping[str, str] | None = None, network: Network = "none",
                    readonly_rootfs: bool = False, cwd: str = CONTAINER_HOME) -> KernelSpec:
        """The container for an agent's export answer.

        An export that binds ``/home/work`` itself (the agent's kernel home)
        replaces ``scratch_dir``.
        """
        binds = tuple(BindMount.from_oci(m) for m in export.mounts)
        if exports_home(export):
            scratch_dir = None
        return cls(kernel_id=export.kernel_id, args=tuple(args), uid=uid, gid=gid,
                   env=dict(env or {}), cwd=cwd, scratch_dir=scratch_dir, binds=binds,
                   network=network, readonly_rootfs=readonly_rootfs)

    def environment(self, default_path: bool = True) -> list[str]:
        """``KEY=VALUE`` list with HOME (and PATH, unless an image supplies it) defaulted."""
        env = {"PATH": DEFAULT_PATH} if default_path else {}
        env["HOME"] = CONTAINER_HOME
        env.update(self.env)
        return [f"{k}={v}" for k, v in env.items()]

    def ordered_binds(self) -> list[BindMount]:
        """Scratch home first, then the export's binds, shallower destinations first."""
        binds: list[BindMount] = []
        if self.scratch_dir is not None:
            binds.append(BindMount(self.scratch_dir, CONTAINER_HOME, readonly=False))
        return binds + sorted(self.binds, key=_depth_key)


def exports_home(export: ExportResponse) -> bool:
    """True if the export brings the kernel's ``/home/work`` itself."""
    return any(posixpath.normpath(m.destination) == CONTAINER_HOME for m in export.mounts)


def _depth_key(bind: BindMount) -> tuple[int, str]:
    return (bind.destination.count("/"), bind.destination)


def check_sources(binds: Iterable[BindMount]) -> None:
    """Every bind source exists, so a runtime never invents an empty directory."""
    for bind in binds:
        try:
            bind.source.stat()
        except OSError as exc:
            raise InvalidArgument(
                f"bind source {str(bind.source)!r} for {bind.destination!r} "
                f"is not usable: {exc.strerror}") from None
