"""The running agent: its parts wired together, the start sequence and the watchdog.

Start sequence (:meth:`Agent.start`), in the order DESIGN.md gives:
read the volume config, mount the ``startup`` volumes, reuse the running
fusehost or clean its stale mount and start a new one, rebuild volume
refcounts from the journal, make the FUSE namespace equal to the journal,
unmount volume mounts no recorded export uses.

The watchdog (:meth:`Agent.run_watchdog`) checks the fusehost every few
seconds; if it died, it is restarted and the journal's views re-attached
(containers that held binds of the dead mount see ``ENOTCONN`` until
recreated -- the kernel cannot repair an existing bind -- but new and
restored exports work again).
"""

from __future__ import annotations

import contextlib
import logging
import time
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
            volume_io=config.volume_io, debug=config.debug)
        self.mounter = HostMounter(config.state_dir, uid=config.volume_uid,
                                   gid=config.volume_gid)
        self.journal = Journal.load(config.journal_path)
        self.client = FuseHostClient(config.fusehost_socket)
        self.service = ExportService(config, self.catalog, self.mounter, self.client,
                                     self.journal)
        self.fusehost_restarts = 0
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
        client, _ = await ensure_fusehost(self.spec)
        self.client = self.service.client = client
        await self.service.restore_volumes()
        await self.service.reconcile_views()
        await self.service.unmount_orphans()
        log.info("agent %s ready: %d kernels restored, %d volumes mounted",
                 self.config.agent_id, len(self.journal.kernels), len(self.mounter.mounts()))

    async def recover_fusehost(self) -> bool:
        """Restarts a dead fusehost and re-attaches the journal's views; True if it did."""
        async with self._recover_lock:
            client, restarted = await ensure_fusehost(self.spec)
            old, self.client = self.client, client
            self.service.client = client
            with contextlib.suppress(Exception):
                await old.aclose()
            if restarted:
                self.fusehost_restarts += 1
                log.warning("the fusehost was restarted; restoring %d kernels' views",
                            len(self.journal.kernels))
            await self.service.reconcile_views()
            return restarted

    async def run_watchdog(self) -> None:
        while True:
            await trio.sleep(self.config.watchdog_interval)
            try:
                await self.client.health()
                state = await trio.to_thread.run_sync(mount_state, self.config.mountpoint)
                if state == "healthy":
                    continue
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
        ok = fusehost["ok"] and state == "healthy" and not self.service.startup_failures \
            and not self.service.unrestored and not degraded
        return {
            "status": "ok" if ok else "degraded",
            "agent_id": self.config.agent_id,
            "uptime": round(time.time() - self.started_at, 3),
            "fuse": {"mountpoint": str(self.config.mountpoint), "state": state,
                     "restarts": self.fusehost_restarts, **fusehost},
            "kernels": len(self.journal.kernels),
            "volumes": self.service.volume_refcounts(),
            "startup_failures": self.service.startup_failures,
            "unrestored_views": self.service.unrestored,
            #: each host volume's I/O as the FUSE process sees it (state, threads, timeouts)
            "volume_io": volume_io,
            "degraded_volumes": degraded,
        }

    async def shutdown(self, unmount: bool) -> None:
        """Ends the agent; with ``unmount`` also the FUSE mount and the host volumes."""
        if unmount:
            log.info("unmounting the FUSE filesystem and the host volumes")
            await stop_fusehost(self.spec, self.client)
            try:
                await self.mounter.release_all()
            except MountError as exc:
                log.error("%s", exc)
        with contextlib.suppress(Exception):
            if self._watch is not None:
                self._watch.cancel()
            self.store.close()
