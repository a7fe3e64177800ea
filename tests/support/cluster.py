"""A whole cluster on loopback: managers and agents as real processes, one shared volume.

Every agent has its own state dir, FUSE mountpoint, control socket and etcd
registration (a lease of :data:`REGISTRATION_TTL` seconds); their volume
config lives in etcd, where the ``shared`` volume is a ``bind`` of one
directory that stands in for an SMB share every node mounts.  The managers
share one PostgreSQL database and the same etcd::

    with Cluster(tmp, postgres.new_database(), etcd_server.endpoint, agents=3) as c:
        admin = c.admin_token
        c.managers[0].client(admin).post("/v1/vfolders", json={"alias": "data"})
        c.managers[1].kill()          # kill -9
        c.agents[2].kill()            # kill -9 of the agent (its fusehost survives)

Leaving the ``with`` block stops every process and unmounts everything
under ``tmp``, even when the test failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from azfs.volumes.etcd_store import EtcdVolumeStore
from azfs.volumes.model import load_yaml_file
from tests.support.agent import AgentHarness
from tests.support.services import free_port, stop_process, wait_until

BIN = Path(sys.executable).parent
REGISTRATION_TTL = 5
#: fast cluster timers, so that a failover is seen within seconds
MANAGER_TIMERS = {"leader_interval": 0.5, "reconcile_interval": 0.5, "sweep_interval": 1.0,
                  "sweep_min_age": 600.0, "agent_timeout": 10.0}


class ManagerProcess:
    """One ``azfs-managerd`` on a free port; restartable on the same config."""

    def __init__(self, root: Path, index: int, database_url: str, etcd: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.name = f"manager-{index}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "managerd.log"
        self.config = root / "managerd.toml"
        self.config.write_text(
            f'listen = "127.0.0.1:{self.port}"\nstate_dir = "{root / "state"}"\n'
            f'etcd = "{etcd}"\n' + "".join(f"{k} = {v}\n" for k, v in MANAGER_TIMERS.items()))
        self.env = {**os.environ, "AZFS_MANAGERD_DATABASE_URL": database_url}
        self.proc: subprocess.Popen | None = None

    def cmd(self, *args: str) -> list[str]:
        return [str(BIN / "azfs-managerd"), "--config", str(self.config), *args]

    def health(self) -> dict[str, Any] | None:
        try:
            r = httpx.get(f"{self.url}/v1/health", timeout=2)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd(), stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=self.env)
        try:
            wait_until(lambda: self.health() is not None, 30, self.name, self.proc, self.log)
        except BaseException:
            self.stop()
            raise

    def kill(self) -> None:
        """kill -9: no shutdown code runs, its database sessions just drop."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=20)
            self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def is_leader(self) -> bool:
        health = self.health()
        return bool(health and health.get("leader"))

    def client(self, token: str, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"},
                            timeout=timeout)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Cluster:
    def __init__(self, root: Path, database_url: str, etcd: str, agents: int = 3,
                 managers: int = 2) -> None:
        self.root = root
        self.etcd = etcd
        self.shared = root / "shared"
        self.shared.mkdir(parents=True, exist_ok=True)
        self.agents = [self._agent(i) for i in range(1, agents + 1)]
        self.managers = [ManagerProcess(root / f"manager-{i}", i, database_url, etcd)
                         for i in range(1, managers + 1)]
        self.admin_token = ""

    def _agent(self, index: int) -> AgentHarness:
        harness = AgentHarness(self.root / f"node-{index}", volumes={"shared": "requested"})
        harness.write_config(etcd=self.etcd, agent_id=f"node-{index}",
                             registration_ttl=REGISTRATION_TTL)
        return harness

    def _import_volumes(self) -> None:
        spec = self.root / "volumes.yaml"
        spec.write_text("volumes:\n  - name: shared\n    mount:\n      at: requested\n"
                        f"      fstype: bind\n      path: {self.shared}\n")
        store = EtcdVolumeStore(self.etcd)
        try:
            store.import_volumes(load_yaml_file(spec))
        finally:
            store.close()

    def __enter__(self) -> Cluster:
        try:
            self._import_volumes()
            first = self.managers[0]
            out = subprocess.run(first.cmd("create-user", "admin", "--admin"), env=first.env,
                                 capture_output=True, text=True, check=True)
            self.admin_token = json.loads(out.stdout)["token"]
            for harness in self.agents:
                harness.start()
            for manager in self.managers:
                manager.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for manager in self.managers:
            with contextlib.suppress(Exception):
                manager.stop()
        for harness in self.agents:
            with contextlib.suppress(Exception):
                harness.cleanup()
        with open("/proc/self/mountinfo") as fh:
            points = [line.split()[4] for line in fh]
        for point in sorted((p for p in points if p.startswith(str(self.root))), reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)

    def leader(self) -> ManagerProcess | None:
        leaders = [m for m in self.managers if m.running and m.is_leader()]
        assert len(leaders) <= 1, f"two leaders at once: {[m.name for m in leaders]}"
        return leaders[0] if leaders else None

    def user(self, name: str) -> str:
        """Creates user ``name`` (through the first running manager); its token."""
        manager = next(m for m in self.managers if m.running)
        with manager.client(self.admin_token) as c:
            r = c.post("/v1/users", json={"name": name})
            assert r.status_code == 201, r.text
            return r.json()["token"]
