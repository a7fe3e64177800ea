"""The manager's wiring: one object holding the database, volumes and services."""

from __future__ import annotations

import logging

import trio

from managerd.config import ManagerConfig
from managerd.db import migrate
from managerd.db.session import Database
from managerd.leader import LeaderLease
from managerd.services.agents import AgentDirectory, agent_tls
from managerd.services.datasets import DatasetService
from managerd.services.kernels import KernelService
from managerd.services.reconcile import Reconciler
from managerd.services.users import UserService
from managerd.services.vfolders import VfolderService
from managerd.sweeper import OrphanSweeper
from managerd.volumes import VolumePool

log = logging.getLogger(__name__)


class Manager:
    def __init__(self, config: ManagerConfig, volumes: VolumePool | None = None) -> None:
        self.config = config
        self.db = Database(config.db_url, config.db_threads)
        self.volumes = volumes or VolumePool(config)
        self.users = UserService(self.db)
        self.vfolders = VfolderService(
            self.db, self.volumes, (config.default_quota_bytes, config.default_quota_files))
        self.agents = AgentDirectory(self.db, config.agents, config.agent_secret, config.etcd,
                                     config.storage_timeout,
                                     agent_tls(config.agent_ca_file, config.agent_cert_file,
                                               config.agent_key_file))
        self.datasets = DatasetService(self.db, config.account_keys, config.sas_ttl,
                                       config.sas_max_ttl)
        self.kernels = KernelService(self.db, self.agents, self.datasets,
                                     config.agent_timeout, config.agent_url)
        self.leader = LeaderLease(self.db.url, config.leader_interval)
        self.reconciler = Reconciler(self.db, self.agents, config.agent_timeout,
                                     config.reconcile_interval, config.reconcile_full_every)

    def migrate(self) -> None:
        """Brings the schema up to date (blocking; before serving)."""
        if self.db.is_sqlite:
            self.config.state_dir.mkdir(parents=True, exist_ok=True)
        migrate.upgrade(self.db.engine)

    async def start(self) -> None:
        await trio.to_thread.run_sync(self.migrate)

    async def leader_work(self) -> None:
        """What must run once in the cluster (under :attr:`leader`), until cancelled."""
        sweeper = OrphanSweeper(self.db, self.volumes, self.config.sweep_min_age,
                                self.config.sweep_interval)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sweeper.run)
            nursery.start_soon(self.reconciler.run)
            nursery.start_soon(self._undo_stale_creates)

    async def _undo_stale_creates(self) -> None:
        """Undoes kernels left ``creating`` by a crashed manager (at most one minute late)."""
        while True:
            try:
                await self.kernels.recover(self.config.stale_create_age)
            except Exception:  # noqa: BLE001 - retried at the next round
                log.exception("undoing stale kernel creates failed")
            await trio.sleep(60.0)

    async def close(self) -> None:
        await self.volumes.close()
        await trio.to_thread.run_sync(self.db.dispose)
