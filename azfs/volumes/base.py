"""The abstract volume store and what every store shares; the stores import only this.

A store validates the whole new config before each write and writes it
atomically: a failed write leaves the store as it was.  Methods are
blocking; daemons call them through ``trio.to_thread.run_sync``.  Watch
callbacks run in a background thread of the store.  Which store a caller
gets is :func:`azfs.volumes.store.open_store`'s business.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable

from azfs.errors import NotFound
from azfs.volumes.model import Volume, VolumeConfigError, validate_name

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
