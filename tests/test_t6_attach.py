"""End to end: vfolders attached to and detached from running runc containers.

A real ``azfs-agentd`` (bind volumes on temp dirs, its fusehost) and busybox
containers run by runc as uid 1000.  The agent's API attaches a vfolder to a
running kernel (it appears inside at its path) and detaches it (it
disappears); bad attaches change nothing.  Then the whole path: a real
``azfs-managerd`` (SQLite) in front of the same agent and the real ``azfs``
CLI: ``azfs kernel attach/detach``, and a vfolder the kernel's owner may not
use is refused by the manager with nothing changed.  Last, the agent removes
a kernel home left by a crash when it starts.
"""
# ruff: noqa: F811 - pytest fixtures are imported by name and requested by name

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agentd.homes import Bind, KernelHomes
from azfs.containers.runc import KernelContainer, Runc
from azfs.export import ExportResponse
from tests.support.agent import AgentHarness, agent  # noqa: F401
from tests.support.containers import (  # noqa: F401
    busybox_rootfs_fixture,
    container_id,
    mountpoints_under,
    runc_fixture,
)
from tests.support.services import free_port, running

BIN = Path(sys.executable).parent


def _vfolder(alias: str, volume: str, path: str, mode: str = "rw", **extra: str) -> dict:
    return {"alias": alias, "volume": volume, "path": path, "mode": mode,
            "vfolder_id": f"vf-{path}", **extra}


async def _export(agent: AgentHarness, kernel_id: str, body: dict) -> ExportResponse:
    async with agent.client() as http:
        r = await http.put(f"/v1/kernels/{kernel_id}", json=body)
    assert r.status_code == 200, r.text
    return ExportResponse.model_validate(r.json())


async def _state(agent: AgentHarness, kernel_id: str) -> dict:
    async with agent.client() as http:
        kernel = (await http.get(f"/v1/kernels/{kernel_id}")).json()
        volumes = (await http.get("/v1/volumes")).json()["volumes"]
    return {"vfolders": kernel["vfolders"], "mounts": kernel["mounts"],
            "refs": {v["name"]: v["refcount"] for v in volumes if v["mounted"]},
            "host": agent.mounts()}


def _start(runc: Runc, rootfs: Path, workdir: Path, export: ExportResponse) -> KernelContainer:
    return KernelContainer(rootfs, export, ["sleep", "3600"], runc=runc,
                           bundle_dir=workdir / f"bundle-{export.kernel_id}")


async def test_attach_and_detach_through_the_agent(
        agent: AgentHarness, busybox_rootfs: Path, runc: Runc, tmp_path: Path) -> None:
    agent.vfolder("vol1", "base")
    (agent.vfolder("vol2", "extra") / "hello").write_text("from vol2\n")
    kid = container_id("att")
    kernel = _start(runc, busybox_rootfs, tmp_path, await _export(
        agent, kid, {"vfolders": [_vfolder("data", "vol1", "base")]}))
    assert kernel.sh("ls /home/work/extra").exit_code != 0
    assert "vol2" not in agent.volume_mounts()

    extra = _vfolder("extra", "vol2", "extra", target="more/extra")
    async with agent.client() as http:
        r = await http.put(f"/v1/kernels/{kid}/vfolders/extra", json=extra)
        assert r.status_code == 200, r.text
        r = kernel.sh("cat /home/work/more/extra/hello && echo new > /home/work/more/extra/n")
        assert (r.exit_code, r.stdout) == (0, "from vol2\n"), r.stderr
        assert (agent.sources["vol2"] / "extra" / "n").read_text() == "new\n"
        assert (await http.put(f"/v1/kernels/{kid}/vfolders/extra", json=extra)) \
            .status_code == 200  # the same again: nothing more
        state = await _state(agent, kid)
        assert [v["alias"] for v in state["vfolders"]] == ["data", "extra"]
        assert state["refs"]["vol2"] == 1

        # refused, and nothing changes
        bad = [
            ("extra", _vfolder("extra", "vol1", "base"), 409, "alias-in-use"),
            ("other", _vfolder("other", "vol1", "base", target="data/sub"), 409,
             "alias-in-use"),
            ("datasets", _vfolder("datasets", "vol2", "extra"), 409, "alias-in-use"),
            ("abs", _vfolder("abs", "vol2", "extra", target="/opt/abs"), 400,
             "not-attachable"),
            ("gone", _vfolder("gone", "vol2", "missing"), 404, "vfolder-not-found"),
            ("nope", _vfolder("nope", "vol9", "x"), 400, "unknown-volume"),
            ("sneak", _vfolder("other", "vol2", "extra"), 400, "invalid-request"),
        ]
        for alias, body, status, code in bad:
            r = await http.put(f"/v1/kernels/{kid}/vfolders/{alias}", json=body)
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), (alias, r.text)
        assert await _state(agent, kid) == state
        r = await http.put("/v1/kernels/no-such/vfolders/extra", json=extra)
        assert r.status_code == 404 and r.json()["error"]["code"] == "kernel-not-found"

        # detach: gone from the container, the volume released; twice is fine
        assert (await http.delete(f"/v1/kernels/{kid}/vfolders/extra")).status_code == 204
        r = kernel.sh("ls /home/work/more/extra")
        assert r.exit_code != 0 and "No such file" in r.stderr, (r.stdout, r.stderr)
        assert (await http.delete(f"/v1/kernels/{kid}/vfolders/extra")).status_code == 204
        state = await _state(agent, kid)
        assert [v["alias"] for v in state["vfolders"]] == ["data"]
        assert "vol2" not in state["refs"]
        r = kernel.sh("echo still > /home/work/data/x && cat /home/work/data/x")
        assert (r.exit_code, r.stdout) == (0, "still\n"), r.stderr
        health = (await http.get("/v1/health")).json()
        assert health["kernel_binds"][kid]["live"] is True
        assert set(health["kernel_binds"][kid]["binds"]) == {"data", "datasets"}

    # a restarted agent has the same kernel, without the detached vfolder
    agent.kill()
    agent.start()
    assert [v["alias"] for v in (await _state(agent, kid))["vfolders"]] == ["data"]
    kernel.stop()
    async with agent.client() as http:
        assert (await http.delete(f"/v1/kernels/{kid}")).status_code == 204
    assert not [m for m in agent.mounts() if "/homes/" in m]


async def test_the_agent_removes_a_home_left_by_a_crash(agent: AgentHarness) -> None:
    agent.stop()
    homes = KernelHomes(agent.state_dir)
    leftover = agent.root / "leftover"
    leftover.mkdir()
    homes.prepare("ghost", 1000, 1000)
    homes.place("ghost", Bind(rel="data", source=str(leftover), read_only=False))
    assert [m for m in agent.mounts() if "/homes/ghost" in m]
    agent.start()
    assert not [m for m in agent.mounts() if "/homes/ghost" in m]
    assert not homes.path("ghost").exists()


# ---- through the manager and the CLI --------------------------------------------------------
class Node:
    """A real managerd in front of the agent; ``azfs`` run as its users."""

    def __init__(self, agent: AgentHarness, tmp: Path) -> None:
        self.agent = agent
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp / "managerd.toml"
        self.config.write_text(
            f'listen = "127.0.0.1:{self.port}"\nstate_dir = "{tmp / "mstate"}"\n'
            f'volumes_file = "{agent.volumes_file}"\n'
            f'[agents.node1]\nsocket = "{agent.socket}"\n')
        self.env = {**os.environ, "AZFS_MANAGERD_DATABASE_URL": f"sqlite:///{tmp / 'm.db'}"}
        self.log = tmp / "managerd.log"
        self.tokens: dict[str, str] = {}

    def cmd(self, *args: str) -> list[str]:
        return [str(BIN / "azfs-managerd"), "--config", str(self.config), *args]

    def user(self, name: str) -> None:
        out = subprocess.run(self.cmd("create-user", name), env=self.env, capture_output=True,
                             text=True, check=True)
        self.tokens[name] = json.loads(out.stdout)["token"]

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def azfs(self, user: str, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "AZFS_MANAGER_URL": self.url, "AZFS_TOKEN": self.tokens[user],
               "COLUMNS": "200"}
        return subprocess.run([str(BIN / "azfs"), *args], env=env, capture_output=True,
                              text=True, timeout=60)

    def ok(self, user: str, *args: str) -> subprocess.CompletedProcess:
        r = self.azfs(user, *args)
        assert r.returncode == 0, r.stderr
        return r

    def json(self, user: str, *args: str):  # type: ignore[no-untyped-def]
        return json.loads(self.ok(user, *args, "--json").stdout)


@pytest.fixture
def node(agent: AgentHarness, tmp_path: Path) -> Iterator[Node]:
    node = Node(agent, tmp_path)
    with running(node.cmd(), node.log, node.healthy, "azfs-managerd", env=node.env):
        node.user("olive")
        node.user("rhea")
        yield node


def test_attach_and_detach_through_the_manager_and_the_cli(
        node: Node, busybox_rootfs: Path, runc: Runc, tmp_path: Path) -> None:
    node.ok("olive", "folder", "create", "work")
    node.ok("olive", "folder", "create", "extra")
    node.ok("rhea", "folder", "create", "secret")
    node.ok("rhea", "folder", "create", "shared")
    node.ok("rhea", "folder", "share", "shared", "olive", "--permission", "ro")
    secret_id = node.json("rhea", "folder", "info", "secret")["id"]
    kid = container_id("mgr")
    record = node.json("olive", "kernel", "create", kid, "--agent", "node1", "-v", "work")
    docker = node.ok("olive", "kernel", "info", kid, "--docker").stdout
    assert "bind-propagation=rslave" in docker and "target=/home/work" in docker
    kernel = _start(runc, busybox_rootfs, tmp_path, ExportResponse.model_validate(
        {"kernel_id": kid, "mounts": record["mounts"]}))
    assert kernel.sh("echo hi > /home/work/work/a").exit_code == 0

    r = node.ok("olive", "kernel", "attach", kid, "extra", "--ro")
    assert "attached at /home/work/extra" in r.stdout
    r = kernel.sh("ls -d /home/work/extra && touch /home/work/extra/x")
    assert r.exit_code != 0 and os.strerror(30) in r.stderr, (r.stdout, r.stderr)
    assert node.json("olive", "folder", "info", "extra")["status"] == "mounted"
    info = node.json("olive", "kernel", "info", kid)
    assert [(v["alias"], v["mode"]) for v in info["vfolders"]] == [("work", "rw"),
                                                                    ("extra", "ro")]

    # what olive may not use is refused by the manager, and nothing changes
    before = (node.json("olive", "kernel", "info", kid), node.agent.mounts(),
              node.json("rhea", "folder", "info", "secret")["status"])
    for args, code in [((secret_id,), "vfolder-not-found"),
                       (("work", "--path", "again"), "conflict")]:
        r = node.azfs("olive", "kernel", "attach", kid, *args)
        assert r.returncode == 1 and f"[{code}]" in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    r = httpx.post(f"{node.url}/v1/kernels/{kid}/vfolders", timeout=30,
                   headers={"Authorization": f"Bearer {node.tokens['olive']}"},
                   json={"vfolder": "shared", "mode": "rw"})  # a read-only share, asked rw
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
    assert (node.json("olive", "kernel", "info", kid), node.agent.mounts(),
            node.json("rhea", "folder", "info", "secret")["status"]) == before
    assert kernel.sh("ls /home/work/secret").exit_code != 0
    r = node.azfs("rhea", "kernel", "attach", kid, "secret")
    assert r.returncode == 1 and "[kernel-not-found]" in r.stderr, r.stderr

    r = node.ok("olive", "kernel", "detach", kid, "extra")
    r = kernel.sh("ls /home/work/extra")
    assert r.exit_code != 0 and "No such file" in r.stderr, (r.stdout, r.stderr)
    assert node.json("olive", "folder", "info", "extra")["status"] == "ready"
    assert [v["alias"] for v in node.json("olive", "kernel", "info", kid)["vfolders"]] \
        == ["work"]
    assert node.ok("olive", "kernel", "detach", kid, "extra").returncode == 0  # twice: fine

    kernel.stop()
    node.ok("olive", "kernel", "rm", kid)
    assert not [m for m in node.agent.mounts() if "/homes/" in m]
