"""Where the remote volume config lives: one abstract store, one module per kind.

* :class:`~azfs.volumes.etcd_store.EtcdVolumeStore` — the cluster store (one
  key per volume under a prefix, passwords under a separate prefix, every
  write one transaction, watchable);
* :class:`~azfs.volumes.yaml_store.YamlVolumeStore` — the embedded default of
  a single node: a YAML file, passwords in a mode-0600 side file.

Every write validates the whole new config first and is atomic: a failed
write leaves the store as it was.  Methods are blocking; daemons call them
through ``trio.to_thread.run_sync``.  Watch callbacks run in a background
thread of the store.
"""

from __future__ import annotations

import abc
import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from azfs.errors import NotFound, UserError
from azfs.volumes.model import Volume, VolumeConfigError, validate_name

if TYPE_CHECKING:
    from azfs.volumes.etcd_store import EtcdAuth

#: Environment variables naming the store when no flag is given.
ENV_ETCD = "AZFS_ETCD"
ENV_VOLUMES_FILE = "AZFS_VOLUMES_FILE"
#: The embedded default of a single-node install.
DEFAULT_VOLUMES_FILE = Path("/etc/azfs/volumes.yaml")

#: Called with the full new list of volumes after each change.
WatchCallback = Callable[[list[Volume]], None]


class Watch(abc.ABC):
    """A running watch; :meth:`cancel` stops it (idempotent)."""

    @abc.abstractmethod
    def cancel(self) -> None: ...

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class VolumeStore(abc.ABC):
    """The remote volume config, whatever holds it."""

    #: A human-readable description of the store, e.g. ``etcd 10.0.0.1:2379``.
    description: str = "volume store"

    @abc.abstractmethod
    def list(self) -> list[Volume]:
        """All volumes, sorted by name, with their passwords."""

    def get(self, name: str) -> Volume:
        """One volume; raises :class:`~azfs.errors.NotFound`."""
        validate_name(name)
        for volume in self.list():
            if volume.name == name:
                return volume
        raise NotFound(f"no volume named {name!r} in {self.description}")

    @abc.abstractmethod
    def replace_all(self, volumes: Iterable[Volume]) -> None:
        """Makes the store hold exactly ``volumes``, in one atomic write."""

    def import_volumes(self, volumes: Iterable[Volume], replace: bool = False) -> None:
        """Adds or updates ``volumes``; with ``replace``, also drops all others."""
        volumes = check_unique(volumes)
        if replace:
            self.replace_all(volumes)
            return
        self._update(lambda current: merge(current, volumes))

    def remove(self, name: str) -> None:
        """Removes one volume; raises :class:`~azfs.errors.NotFound`."""
        validate_name(name)

        def without(current: list[Volume]) -> list[Volume]:
            if not any(v.name == name for v in current):
                raise NotFound(f"no volume named {name!r} in {self.description}")
            return [v for v in current if v.name != name]

        self._update(without)

    @abc.abstractmethod
    def _update(self, change: Callable[[list[Volume]], list[Volume]]) -> None:
        """Read-modify-write of the whole config, atomic against other writers."""

    @abc.abstractmethod
    def watch(self, callback: WatchCallback) -> Watch:
        """Calls ``callback(volumes)`` from a background thread after each change."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases connections and stops watches."""

    def __enter__(self) -> VolumeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_unique(volumes: Iterable[Volume]) -> list[Volume]:
    """Revalidates volumes built in code (not parsed): names and duplicates."""
    volumes = list(volumes)
    for volume in volumes:
        if not isinstance(volume, Volume):
            raise VolumeConfigError(f"not a Volume: {type(volume).__name__}")
    seen: set[str] = set()
    for index, volume in enumerate(volumes):
        validate_name(volume.name, f"volumes[{index}].name")
        if volume.name in seen:
            raise VolumeConfigError(f"volumes[{index}].name: duplicate name {volume.name!r}")
        seen.add(volume.name)
    return volumes


def merge(current: Iterable[Volume], new: Iterable[Volume]) -> list[Volume]:
    by_name = {v.name: v for v in current}
    by_name.update((v.name, v) for v in new)
    return sorted(by_name.values(), key=lambda v: v.name)


def atomic_write(path: Path, text: str, mode: int) -> None:
    """Replaces ``path`` with ``text`` (created with ``mode``) so readers see old or new."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def open_store(etcd: str | None = None, config_file: str | Path | None = None,
               cache_file: str | Path | None = None, timeout: float = 5.0,
               etcd_auth: EtcdAuth | None = None) -> VolumeStore:
    """The store named by the arguments, else by ``$AZFS_ETCD`` / ``$AZFS_VOLUMES_FILE``.

    With nothing given, the single-node default file ``/etc/azfs/volumes.yaml``.
    ``etcd`` may list several members (``h1:2379,h2:2379``).  ``cache_file``
    (etcd only) keeps the last good config for reads during an etcd outage.
    ``etcd_auth`` defaults to :meth:`EtcdAuth.from_env` (``$AZFS_ETCD_USER``...).
    """
    if etcd and config_file:
        raise UserError("give either an etcd endpoint or a config file, not both")
    if not etcd and not config_file:
        etcd = os.environ.get(ENV_ETCD) or None
        config_file = os.environ.get(ENV_VOLUMES_FILE) or None
        if etcd and config_file:
            raise UserError(f"both ${ENV_ETCD} and ${ENV_VOLUMES_FILE} are set; "
                            "pass --etcd or --config-file to choose")
    if etcd:
        from azfs.volumes.etcd_store import EtcdAuth, EtcdVolumeStore

        return EtcdVolumeStore(etcd, timeout=timeout, cache_file=cache_file,
                               auth=etcd_auth or EtcdAuth.from_env())
    from azfs.volumes.yaml_store import YamlVolumeStore

    return YamlVolumeStore(config_file or DEFAULT_VOLUMES_FILE)
