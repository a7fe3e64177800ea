"""A real ``azfs-agentd`` for tests: bind volumes on temp dirs, a YAML volume file,
its own state dir, control socket and FUSE mountpoint.

Use the ``agent`` fixture (import it into a test module)::

    from tests.support.agent import agent  # noqa: F401

    async def test_x(agent):
        async with agent.client() as http:
            await http.put("/v1/kernels/k1", json={...})
        agent.kill()            # kill -9 the agent (the fusehost survives)
        agent.start()           # a new agent on the same state

Teardown always stops the agent, kills the fusehost, and detaches every
mount under the test's temp dir, even when the test failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from azfs.volumes.hostmount import lazy_unmount
from azfs.volumes.mountinfo import mounts_under
from tests.support.services import stop_process, wait_until

REPO = Path(__file__).resolve().parents[2]


class AgentHarness:
    """One agent and its fusehost; restartable on the same state."""

    def __init__(self, root: Path, volumes: dict[str, str] | None = None) -> None:
        self.root = root
        self.state_dir = root / "state"
        self.socket = root / "agent.sock"
        self.mountpoint = self.state_dir / "fuse"
        self.volumes_file = root / "volumes.yaml"
        self.config_file = root / "agent.toml"
        self.log = root / "agent.log"
        self.proc: subprocess.Popen | None = None
        self.sources: dict[str, Path] = {}
        self.write_volumes(volumes or {"vol1": "requested", "vol2": "requested",
                                       "datasets": "startup"})
        self.write_config()

    # ---- configuration --------------------------------------------------------------
    def write_volumes(self, volumes: dict[str, str], options: dict[str, str] | None = None
                      ) -> None:
        """Bind volumes ``name → at`` over directories ``root/src-<name>``."""
        lines = ["volumes:"]
        for name, at in volumes.items():
            src = self.sources.setdefault(name, self.root / f"src-{name}")
            src.mkdir(parents=True, exist_ok=True)
            opts = (options or {}).get(name, "")
            lines += [f"  - name: {name}", "    mount:", f"      at: {at}",
                      "      fstype: bind", f"      path: {src}",
                      f"      options: \"{opts}\""]
        self.volumes_file.write_text("\n".join(lines) + "\n")

    def write_config(self, etcd: str | None = None, manager: dict | None = None,
                     cache: dict | None = None, volume_io: dict | None = None,
                     **extra: object) -> None:
        """The agent's TOML; the volume store is the YAML file unless ``etcd`` is given."""
        values = {"agent_id": "test-node", "state_dir": str(self.state_dir),
                  "socket": str(self.socket), "watchdog_interval": 0.5, **extra}
        text = "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
        if etcd:
            text += f"[store]\netcd = {json.dumps(etcd)}\n"
        else:
            text += f"[store]\nvolumes_file = {json.dumps(str(self.volumes_file))}\n"
        for table, values in (("manager", manager), ("cache", cache),
                              ("volume_io", volume_io)):
            if values:
                text += f"[{table}]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                                 for k, v in values.items())
        self.config_file.write_text(text)

    def vfolder(self, volume: str, name: str) -> Path:
        path = self.sources[volume] / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ---- processes ---------------------------------------------------------------------
    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)),
                              base_url="http://agent", timeout=2) as client:
                return client.get("/v1/kernels").status_code == 200
        except httpx.HTTPError:
            return False

    def start(self, *args: str) -> subprocess.Popen:
        assert self.proc is None or self.proc.poll() is not None, "agent already running"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agentd.main", "--config", str(self.config_file), *args],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                cwd=REPO)
        try:
            wait_until(self._answers, 30, "azfs-agentd", self.proc, self.log)
        except BaseException:
            self.stop()
            raise
        return self.proc

    def kill(self) -> None:
        """kill -9 of the agent (not of its fusehost)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> int | None:
        """SIGTERM; returns the agent's exit status."""
        if self.proc is None:
            return None
        stop_process(self.proc, timeout=20)
        code = self.proc.returncode
        self.proc = None
        return code

    def fusehost_pid(self) -> int | None:
        try:
            pid = int((self.state_dir / "run" / "fusehost.pid").read_text())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if b"agentd.fusehost" in cmdline else None

    def kill_fusehost(self) -> None:
        pid = self.fusehost_pid()
        assert pid is not None, "no fusehost running"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if not _alive(pid):
                break
            time.sleep(0.02)

    def cleanup(self) -> None:
        self.stop()
        pid = self.fusehost_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for entry in sorted(mounts_under(self.root), key=lambda e: -len(e.mount_point)):
            with contextlib.suppress(Exception):
                lazy_unmount(entry.mount_point)

    # ---- observation -------------------------------------------------------------------
    def client(self, timeout: float = 30.0) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(self.socket)),
                                 base_url="http://agent", timeout=timeout)

    def mounts(self) -> list[str]:
        """Mount points under this harness's temp dir (from /proc/self/mountinfo)."""
        return sorted(e.mount_point for e in mounts_under(self.root))

    def volume_mounts(self) -> list[str]:
        return sorted(Path(m).name for m in self.mounts()
                      if Path(m).parent == self.state_dir / "volumes")

    def fuse_path(self, kernel_id: str, alias: str) -> Path:
        return self.mountpoint / "kernels" / kernel_id / alias


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentHarness]:
    harness = AgentHarness(tmp_path)
    try:
        harness.start()
        yield harness
    finally:
        harness.cleanup()
    assert harness.mounts() == [], "mounts left behind after teardown"
