"""The manager's own view of the ``requested`` host volumes (the only place that knows how).

The manager mounts each ``requested`` volume once (through the library's
host mounter), creates and removes vfolder directories on it, and picks the
volume with most free space for a new vfolder.  Hung storage must not hang
the manager: every statvfs, mkdir, rmtree and mount runs in a worker thread
under :attr:`VolumePool.limiter` with a deadline; a thread stuck in state D
is abandoned and the request fails with ``volume-unavailable``.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from azfs.errors import UserError
from azfs.hostdirs import ensure_private_dir
from azfs.volumes.hostmount import STALE_ERRNOS
from managerd.config import ManagerConfig
from managerd.errors import ApiError, NotFound, Unavailable
from managerd.usage import init_usage

log = logging.getLogger(__name__)
T = TypeVar("T")
#: how long a read of the volume config is reused (a create needs it every time).
CONFIG_CACHE_SECONDS = 5.0


class VolumeUnavailable(Unavailable):
    code = "volume-unavailable"


class StorageTimeout(VolumeUnavailable):
    """The call did not return in time; its thread was left to finish on its own."""


class VolumePool:
    def __init__(self, config: ManagerConfig, store: Any = None, mounter: Any = None) -> None:
        self._config = config
        self._store = store
        self._mounter = mounter
        self._mounted: dict[str, Path] = {}
        self._locks: dict[str, trio.Lock] = {}
        self.timeout = config.storage_timeout
        self._limiter: trio.CapacityLimiter | None = None
        self._cache: tuple[float, list[Any]] | None = None
        self._objects: dict[str, Any] = {}

    @property
    def limiter(self) -> trio.CapacityLimiter:
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(16)
        return self._limiter

    async def storage(self, fn: Callable[..., T], *args: Any, what: str = "storage",
                      volume: str | None = None) -> T:
        """Runs a blocking storage call off the loop, giving up after the timeout.

        When the call on ``volume`` fails with a dead-mount error (ENOTCONN,
        ESTALE...), the volume's mount is checked and remounted if it died, and
        the call is tried once more.
        """
        for attempt in (1, 2):
            try:
                with trio.fail_after(self.timeout):
                    return await trio.to_thread.run_sync(
                        lambda: fn(*args), limiter=self.limiter, abandon_on_cancel=True)
            except trio.TooSlowError:
                raise StorageTimeout(f"{what}: no answer from storage in {self.timeout:g}s") \
                    from None
            except OSError as exc:
                if attempt == 1 and volume is not None and exc.errno in STALE_ERRNOS \
                        and await self._remount(volume):
                    continue
                raise VolumeUnavailable(f"{what}: {exc.strerror or exc}") from None
        raise AssertionError("unreachable")

    async def _remount(self, name: str) -> bool:
        """Replaces the manager's mount of ``name`` after a dead-mount error.

        The manager holds the only reference of its own mounter (its own state
        dir), so dropping it unmounts the dead mount (and removes the mount
        point, so nothing lands on the local disk meanwhile); acquiring again
        mounts afresh.  True if the volume is mounted again.
        """
        volume = self._objects.get(name)
        if volume is None or self._mounter is None:
            return False
        log.warning("volume %s: dead mount; remounting", name)
        async with self._locks.setdefault(name, trio.Lock()):
            self._mounted.pop(name, None)
            try:
                await self._mounter.release(volume)
                self._mounted[name] = Path(await self._mounter.acquire(volume))
            except Exception as exc:  # noqa: BLE001 - the caller reports the original error
                log.warning("volume %s: remount failed: %s", name, exc)
                return False
        return True

    # -- config --------------------------------------------------------------

    async def _volumes(self) -> list[Any]:
        """The ``requested`` volumes; the config is re-read at most every few seconds."""
        now = trio.current_time()
        if self._cache is not None and now - self._cache[0] < CONFIG_CACHE_SECONDS:
            return self._cache[1]
        store = await self._get_store()
        try:
            volumes = await self.storage(store.list, what="reading the volume config")
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken store is an operator error
            raise VolumeUnavailable(f"cannot read the volume config: {exc}") from None
        requested = [v for v in volumes if v.mount.at == "requested"]
        self._cache = (now, requested)
        return requested

    async def requested(self) -> list[str]:
        return [v.name for v in await self._volumes()]

    async def _get_store(self) -> Any:
        if self._store is None:
            self._store = await trio.to_thread.run_sync(_open_store, self._config)
        return self._store

    # -- mounting ------------------------------------------------------------

    async def mount(self, name: str) -> Path:
        """The manager's mount of volume ``name`` (mounted on first use, kept)."""
        if name in self._mounted:
            return self._mounted[name]
        lock = self._locks.setdefault(name, trio.Lock())
        async with lock:
            if name in self._mounted:
                return self._mounted[name]
            volume = next((v for v in await self._volumes() if v.name == name), None)
            if volume is None:
                raise NotFound(f"no requested host volume named {name!r}",
                               code="volume-not-found")
            mounter = self._get_mounter()
            try:  # the mounter bounds mount(8) and its probes with its own timeouts
                path = Path(await mounter.acquire(volume))
            except ApiError:
                raise
            except Exception as exc:  # noqa: BLE001 - mount errors become one API code
                raise VolumeUnavailable(f"cannot mount volume {name!r}: {exc}") from None
            self._mounted[name] = path
            self._objects[name] = volume
            return path

    def _get_mounter(self) -> Any:
        if self._mounter is None:
            try:  # only root may reach the vfolders below the manager's mounts
                ensure_private_dir(self._config.mount_dir, "manager mount directory")
            except UserError as exc:
                raise VolumeUnavailable(str(exc)) from None
            self._mounter = _make_mounter(self._config.mount_dir, self.timeout)
        return self._mounter

    async def close(self) -> None:
        """Releases every volume this manager mounted (at shutdown)."""
        volumes = {v.name: v for v in await self._volumes_quiet()}
        for name in list(self._mounted):
            self._mounted.pop(name)
            if name in volumes and self._mounter is not None:
                with trio.move_on_after(self.timeout) as scope:
                    scope.shield = True
                    try:
                        await self._mounter.release(volumes[name])
                    except Exception as exc:  # noqa: BLE001 - shutdown goes on
                        log.warning("cannot release volume %s: %s", name, exc)

    async def _volumes_quiet(self) -> list[Any]:
        try:
            return await self._volumes()
        except ApiError:
            return []

    # -- placement -----------------------------------------------------------

    async def free_bytes(self, name: str) -> int:
        path = await self.mount(name)
        st = await self.storage(os.statvfs, path, what=f"statfs of volume {name!r}",
                                volume=name)
        return st.f_bavail * st.f_frsize

    async def choose(self, name: str | None = None) -> tuple[str, Path]:
        """The named volume, or the reachable ``requested`` one with most free space."""
        if name is not None:
            return name, await self.mount(name)
        names = await self.requested()
        if not names:
            raise Unavailable("no requested host volume is configured", code="no-volume")
        free: dict[str, int] = {}

        async def probe(volume: str) -> None:
            try:
                free[volume] = await self.free_bytes(volume)
            except ApiError as exc:
                log.warning("volume %s skipped: %s", volume, exc.message)

        async with trio.open_nursery() as nursery:
            for volume in names:
                nursery.start_soon(probe, volume)
        if not free:
            raise Unavailable("no requested host volume is reachable", code="no-volume")
        best = max(sorted(free), key=lambda v: free[v])
        return best, self._mounted[best]

    # -- vfolder directories -------------------------------------------------

    async def vfolder_dir(self, volume: str, path: str) -> Path:
        return (await self.mount(volume)) / path

    async def make_dir(self, volume: str, directory: Path) -> None:
        await self.storage(_mkdir_with_ledger, directory, what="creating the vfolder directory",
                           volume=volume)

    async def remove_dir(self, volume: str, directory: Path) -> None:
        await self.storage(remove_tree, directory, what="removing the vfolder directory",
                           volume=volume)


def _mkdir_with_ledger(directory: Path) -> None:
    """Creates the vfolder directory with a clean usage ledger (0 bytes, 0 files)."""
    os.mkdir(directory, 0o755)
    try:
        init_usage(directory)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def remove_tree(directory: Path) -> None:
    try:
        shutil.rmtree(directory)
    except FileNotFoundError:
        pass


# -- library glue (the one place that knows azfs.volumes) --------------------

def _open_store(config: ManagerConfig) -> Any:
    try:
        from azfs.volumes.store import open_store
    except ImportError:
        return _FileStore(config.volumes_file)
    return open_store(etcd=config.etcd, config_file=config.volumes_file)


def _make_mounter(state_dir: Path, timeout: float) -> Any:
    try:
        from azfs.volumes.hostmount import HostMounter
    except ImportError:
        return _BindOnlyMounter()
    # cifs files belong to root on the manager's host: it creates directories, nobody reads
    return HostMounter(state_dir, uid=0, gid=0, probe_timeout=timeout,
                       mount_timeout=max(timeout, 30.0))


class _FileStore:
    """Volume config from a YAML file, until the library's stores are available."""

    def __init__(self, path: Path | None) -> None:
        self._path = path

    def list(self) -> list[Any]:
        if self._path is None:
            return []
        from azfs.volumes.model import load_yaml_file
        return load_yaml_file(self._path)

    def get(self, name: str) -> Any:
        return next((v for v in self.list() if v.name == name), None)


class _BindOnlyMounter:
    """Serves ``bind`` volumes in place; other fstypes need the library's mounter."""

    async def acquire(self, volume: Any) -> Path:
        if volume.mount.fstype != "bind":
            raise RuntimeError(f"fstype {volume.mount.fstype} needs azfs.volumes.hostmount")
        path = Path(volume.mount.path)
        if not await trio.to_thread.run_sync(path.is_dir):
            raise RuntimeError(f"{path} is not a directory")
        return path

    async def release(self, volume: Any) -> None:
        return None

    def path_for(self, name: str) -> Path:
        raise KeyError(name)
