"""The running agent: its parts wired together, the start sequence and the watchdog.

Start sequence (:meth:`Agent.start`), in the order DESIGN.md gives:
read the volume config, mount the ``startup`` volumes, reuse the running
fusehost or clean its stale mount and start a new one, rebuild volume
refcounts from the journal, make the FUSE namespace equal to the journal,
unmount volume mounts no recorded export uses.

The watchdog (:meth:`Agent.run_watchdog`) checks the fusehost every few
seconds; if it died, it is restarted, the journal's views re-attached and
the dead binds in the kernels' homes replaced (:mod:`agentd.homes`): running
containers see their ``/home/work/<alias>`` again, at the same path.  It
also re-places any bind it finds missing or dead while the fusehost is fine.
:meth:`Agent.restart_fusehost` does the same on purpose, to upgrade the
fusehost.  Restarts are counted in the state dir, across agent restarts.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import trio

from agentd.config import Config
from agentd.exports import ExportService, VolumeCatalog
from agentd.fuseclient import (
    FuseHostClient,
    FuseHostError,
    FuseHostSpec,
    FuseHostUnavailable,
    ensure_fusehost,
    mount_state,
    stop_fusehost,
)
from agentd.journal import Journal
from azfs.volumes.hostmount import HostMounter, MountError
from azfs.volumes.store import VolumeStore, open_store

log = logging.getLogger("agentd")


class Agent:
    def __init__(self, config: Config, store: VolumeStore | None = None) -> None:
        self.config = config
        self.started_at = time.time()
        # with etcd, the last good volume config is kept for starting during an outage
        self.store = store or open_store(
            etcd=config.etcd, config_file=config.volumes_file,
            cache_file=config.state_dir / "volumes-cache.yaml" if config.etcd else None)
        self.catalog = VolumeCatalog(self.store)
        self.spec = FuseHostSpec(
            mountpoint=config.mountpoint, socket_path=config.fusehost_socket,
            pid_file=config.fusehost_pid_file, log_file=config.fusehost_log,
            cache_dir=config.cache_dir, cache_bytes=config.cache_bytes,
            volume_io=config.volume_io, xattrs=config.xattrs,
            listing_entries=config.listing_entries, debug=config.debug)
        self.mounter = HostMounter(config.state_dir, uid=config.volume_uid,
                                   gid=config.volume_gid)
        self.journal = Journal.load(config.journal_path)
        self.client = FuseHostClient(config.fusehost_socket)
        self.service = ExportService(config, self.catalog, self.mounter, self.client,
                                     self.journal)
        self._restarts_file = config.state_dir / "run" / "fusehost-restarts"
        self.fusehost_restarts = _read_count(self._restarts_file)
        #: the last restart: when, why, and how long kernels' binds were dead
        self.last_restart: dict[str, Any] | None = None
        self._recover_lock = trio.Lock()
        self._watch = None

    async def start(self) -> None:
        self.config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.config.fusehost_socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self.catalog.reload()
        try:
            self._watch = self.store.watch(self.catalog.replace)
        except Exception as exc:  # noqa: BLE001 - a miss re-reads the store anyway
            log.warning("cannot watch the volume config: %s", exc)
        await self.service.mount_startup()
        await trio.to_thread.run_sync(self.service.homes.ensure_root)
        client, _ = await ensure_fusehost(self.spec)
        self.client = self.service.client = client
        await self.service.restore_volumes()
        await self.service.reconcile_views()
        await self.service.unmount_orphans()
        log.info("agent %s ready: %d kernels restored, %d volumes mounted",
                 self.config.agent_id, len(self.journal.kernels), len(self.mounter.mounts()))

    async def recover_fusehost(self) -> bool:
        """Restarts a dead fusehost, re-attaches the journal's views and re-binds them
        into the kernels' homes; True if it restarted it."""
        async with self._recover_lock:
            began = time.monotonic()
            restarted = await self._ensure()
            if restarted:
                log.warning("the fusehost was restarted; restoring %d kernels' views",
                            len(self.journal.kernels))
            result = await self.service.reconcile_views()
            if restarted:
                self._count_restart("crash", began, result)
            return restarted

    async def restart_fusehost(self) -> dict[str, Any]:
        """Replaces the running fusehost with a new process (a new version once installed)
        and re-binds every kernel's views; answers the restart's numbers.

        Processes that hold a file open across it get an error on that descriptor;
        a new ``open`` works once the binds are back (``window`` seconds).
        """
        async with self._recover_lock:
            began = time.monotonic()
            old_pid = None
            with contextlib.suppress(FuseHostUnavailable, FuseHostError):
                old_pid = (await self.client.health()).get("pid")
            log.warning("restarting the fusehost (pid %s) on request", old_pid)
            await stop_fusehost(self.spec, self.client)
            await self._ensure()
            result = await self.service.reconcile_views()
            self._count_restart("requested", began, result)
            new_pid = None
            with contextlib.suppress(FuseHostUnavailable, FuseHostError):
                new_pid = (await self.client.health()).get("pid")
            assert self.last_restart is not None
            return {**self.last_restart, "old_pid": old_pid, "pid": new_pid,
                    "restarts": self.fusehost_restarts}

    async def _ensure(self) -> bool:
        client, restarted = await ensure_fusehost(self.spec)
        old, self.client = self.client, client
        self.service.client = client
        with contextlib.suppress(Exception):
            await old.aclose()
        return restarted

    def _count_restart(self, reason: str, began: float, result: dict[str, int]) -> None:
        self.fusehost_restarts += 1
        self.last_restart = {"reason": reason, "at": round(time.time(), 3),
                             "window": round(time.monotonic() - began, 3),
                             "views": result.get("attached", 0),
                             "rebound": result.get("rebound", 0),
                             "failed": result.get("failed", 0)}
        log.warning("fusehost restart (%s): views and binds back after %.3fs", reason,
                    self.last_restart["window"])
        with contextlib.suppress(OSError):
            _write_count(self._restarts_file, self.fusehost_restarts)

    async def run_watchdog(self) -> None:
        while True:
            await trio.sleep(self.config.watchdog_interval)
            try:
                await self.client.health()
                state = await trio.to_thread.run_sync(mount_state, self.config.mountpoint)
                if state == "healthy":
                    if not await self.service.rebind_needed():
                        continue
                    log.error("a kernel's binds are not live; re-binding")
                else:
                    log.error("the FUSE mount is %s; recovering", state)
            except (FuseHostUnavailable, FuseHostError) as exc:
                log.error("the fusehost does not answer (%s); recovering", exc)
            try:
                await self.recover_fusehost()
            except Exception:  # noqa: BLE001 - keep watching; the next round retries
                log.exception("recovering the fusehost failed")

    async def health(self) -> dict[str, Any]:
        fusehost: dict[str, Any]
        try:
            fusehost = await self.client.health()
            fusehost["ok"] = True
        except (FuseHostUnavailable, FuseHostError) as exc:
            fusehost = {"ok": False, "error": str(exc)}
        state = await trio.to_thread.run_sync(mount_state, self.config.mountpoint)
        volume_io = fusehost.pop("volumes", {})
        degraded = sorted(name for name, v in volume_io.items() if v.get("state") != "healthy")
        binds = await self.service.binds_status()
        ok = fusehost["ok"] and state == "healthy" and not self.service.startup_failures \
            and not self.service.unrestored and not degraded \
            and all(k["live"] for k in binds.values())
        return {
            "status": "ok" if ok else "degraded",
            "agent_id": self.config.agent_id,
            "uptime": round(time.time() - self.started_at, 3),
            "fuse": {"mountpoint": str(self.config.mountpoint), "state": state,
                     "restarts": self.fusehost_restarts, "last_restart": self.last_restart,
                     **fusehost},
            "kernels": len(self.journal.kernels),
            "volumes": self.service.volume_refcounts(),
            "startup_failures": self.service.startup_failures,
            "unrestored_views": self.service.unrestored,
            #: each host volume's I/O as the FUSE process sees it (state, threads, timeouts)
            "volume_io": volume_io,
            "degraded_volumes": degraded,
            "kernel_binds": binds,
        }

    async def shutdown(self, unmount: bool) -> None:
        """Ends the agent; with ``unmount`` also the FUSE mount and the host volumes."""
        if unmount:
            log.info("unmounting the kernels' homes, the FUSE filesystem and the host volumes")
            try:
                await trio.to_thread.run_sync(self.service.homes.teardown)
            except OSError as exc:
                log.error("%s", exc)
            await stop_fusehost(self.spec, self.client)
            try:
                await self.mounter.release_all()
            except MountError as exc:
                log.error("%s", exc)
        with contextlib.suppress(Exception):
            if self._watch is not None:
                self._watch.cancel()
            self.store.close()


def _read_count(path: Path) -> int:
    try:
        return max(0, int(path.read_text().strip()))
    except (OSError, ValueError):
        return 0


def _write_count(path: Path, count: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{count}\n")
    tmp.replace(path)
