"""Whole-program tests: agentd crashes and restarts while kernels use their exports.

The FUSE mount lives in the fusehost, a process of its own: killing the
agent (even with SIGKILL) must not interrupt it, and the next agent must
find the same exports and refcounts.  When the fusehost itself dies, the
next agent (or the running agent's watchdog) cleans the stale mount and
restores the views from the journal.
"""
# ruff: noqa: F811 - pytest fixtures are imported by name and requested by name

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from agentd.fuseclient import FuseHostClient
from azfs.volumes.mountinfo import mounts_at
from tests.support.agent import AgentHarness, agent  # noqa: F401
from tests.support.services import wait_until
from tests.test_t5_agent_exports import body, posix


def fuse_mount_id(agent: AgentHarness) -> int:
    entries = mounts_at(agent.mountpoint)
    assert len(entries) == 1, entries
    return entries[0].mount_id


async def state(agent: AgentHarness) -> dict:
    async with agent.client() as http:
        kernels = (await http.get("/v1/kernels")).json()["kernels"]
        volumes = (await http.get("/v1/volumes")).json()["volumes"]
    return {"kernels": {k["kernel_id"]: k["mounts"] for k in kernels},
            "refs": {v["name"]: v["refcount"] for v in volumes if v["mounted"]}}


async def export_three(agent: AgentHarness) -> None:
    agent.vfolder("vol1", "vf-a")
    agent.vfolder("vol2", "vf-b")
    async with agent.client() as http:
        for kernel_id, payload in (
                ("k1", body(posix("a", path="vf-a"))),
                ("k2", body(posix("a", path="vf-a", mode="ro"))),
                ("k3", body(posix("a", path="vf-a"), posix("b", volume="vol2", path="vf-b")))):
            r = await http.put(f"/v1/kernels/{kernel_id}", json=payload)
            assert r.status_code == 200, r.text


async def test_kill9_agent_keeps_the_mount_and_restores_exports(agent: AgentHarness) -> None:
    await export_three(agent)
    before = await state(agent)
    assert before["refs"] == {"datasets": 0, "vol1": 3, "vol2": 1}
    mount_id = fuse_mount_id(agent)
    fusehost = agent.fusehost_pid()
    path = agent.fuse_path("k1", "a") / "kept-open"
    path.write_bytes(b"0123456789" * 1000)
    with open(path, "rb") as kept, open(agent.fuse_path("k3", "b") / "w", "wb") as writer:
        assert kept.read(10) == b"0123456789"
        agent.kill()
        # nobody serves the API now, but the kernels' files work on
        assert kept.read(10) == b"0123456789"
        writer.write(b"while the agent was dead")
        writer.flush()
        assert (agent.fuse_path("k2", "a") / "kept-open").stat().st_size == 10000
        agent.start()
        assert kept.read(10) == b"0123456789"
    assert fuse_mount_id(agent) == mount_id  # the same mount: never interrupted
    assert agent.fusehost_pid() == fusehost
    assert await state(agent) == before
    assert (agent.sources["vol2"] / "vf-b" / "w").read_bytes() == b"while the agent was dead"

    async with agent.client() as http:
        # the restored agent works: the same body is idempotent, a new one a conflict
        again = await http.put("/v1/kernels/k1", json=body(posix("a", path="vf-a")))
        assert again.status_code == 200
        assert again.json()["mounts"] == before["kernels"]["k1"]
        for kernel_id in ("k1", "k2", "k3"):
            assert (await http.delete(f"/v1/kernels/{kernel_id}")).status_code == 204
    assert agent.volume_mounts() == ["datasets"]
    views = await FuseHostClient(agent.state_dir / "run" / "fusehost.sock").list()
    assert views == []


async def test_killed_fusehost_is_cleaned_and_views_restored_at_agent_start(
        agent: AgentHarness) -> None:
    await export_three(agent)
    (agent.sources["vol1"] / "vf-a" / "f").write_text("data on the volume")
    before = await state(agent)
    agent.kill()
    agent.kill_fusehost()
    with pytest.raises(OSError) as info:
        # a listing, not a stat: the export's binds looked the view up, so a stat may
        # answer from the kernel's attribute cache for a moment
        os.listdir(agent.fuse_path("k1", "a"))
    # ECONNABORTED while the kernel tears the dead connection down, ENOTCONN after
    assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    agent.start()
    assert await state(agent) == before
    assert (agent.fuse_path("k1", "a") / "f").read_text() == "data on the volume"
    assert (agent.fuse_path("k2", "a") / "f").read_text() == "data on the volume"
    with pytest.raises(OSError) as info:
        (agent.fuse_path("k2", "a") / "g").write_text("x")
    assert info.value.errno == errno.EROFS
    assert len(mounts_at(agent.mountpoint)) == 1  # the stale mount was detached, not stacked
    async with agent.client() as http:
        health = (await http.get("/v1/health")).json()
        assert health["status"] == "ok"


async def test_watchdog_restarts_a_dead_fusehost(agent: AgentHarness) -> None:
    await export_three(agent)
    (agent.sources["vol2"] / "vf-b" / "f").write_text("still here")
    old = agent.fusehost_pid()
    agent.kill_fusehost()

    def restored() -> bool:
        pid = agent.fusehost_pid()
        try:
            return pid not in (None, old) and \
                (agent.fuse_path("k3", "b") / "f").read_text() == "still here"
        except OSError:
            return False

    wait_until(restored, 30, "views restored by the watchdog", agent.proc, agent.log)
    assert len(mounts_at(agent.mountpoint)) == 1
    async with agent.client() as http:
        health = (await http.get("/v1/health")).json()
    assert health["fuse"]["restarts"] == 1
    assert (await state(agent))["refs"] == {"datasets": 0, "vol1": 3, "vol2": 1}


async def test_sigterm_leaves_mounts_unless_asked_to_unmount(agent: AgentHarness) -> None:
    await export_three(agent)
    before = await state(agent)
    mount_id = fuse_mount_id(agent)
    assert agent.stop() == 0
    assert not agent.socket.exists()
    assert fuse_mount_id(agent) == mount_id
    assert agent.fusehost_pid() is not None
    assert "vol1" in agent.volume_mounts()

    agent.start("--unmount-on-exit")
    assert await state(agent) == before
    pid = agent.fusehost_pid()
    assert agent.stop() == 0
    assert agent.mounts() == []  # FUSE, startup and requested volumes: all gone
    assert pid is not None and not _alive(pid)
    # the exports stay recorded: a new agent brings them back
    agent.start()
    assert await state(agent) == before
    assert (agent.fuse_path("k1", "a")).is_dir()


async def test_second_agent_on_the_same_state_is_refused(agent: AgentHarness) -> None:
    import subprocess
    import sys

    from tests.support.agent import REPO

    second = subprocess.run([sys.executable, "-m", "agentd.main", "--config",
                             str(agent.config_file)], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert second.returncode == 1
    assert "another agent is running" in second.stderr
    assert "Traceback" not in second.stderr
    async with agent.client() as http:
        assert (await http.get("/v1/health")).status_code == 200


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False




async def test_leftovers_of_an_interrupted_export_are_cleaned_at_start(
        agent: AgentHarness) -> None:
    """An agent killed between attaching a view (or mounting a volume) and recording
    the export leaves both behind; the next agent removes what the journal lacks."""
    import subprocess

    await export_three(agent)
    before = await state(agent)
    agent.kill()
    vf = agent.vfolder("vol2", "vf-orphan")
    fusehost = FuseHostClient(agent.state_dir / "run" / "fusehost.sock")
    await fusehost.attach(["kernels", "k-orphan", "x"], {"label": "orphan"},
                          {"kind": "posix", "volume_root": str(agent.sources["vol2"]),
                           "path": "vf-orphan"}, "orphan-digest")
    await fusehost.aclose()
    assert agent.fuse_path("k-orphan", "x").is_dir()
    stray = agent.state_dir / "volumes" / "vol-stray"
    stray.mkdir()
    subprocess.run(["mount", "--bind", str(vf), str(stray)], check=True)

    agent.start()
    assert await state(agent) == before
    assert not (agent.mountpoint / "kernels" / "k-orphan").exists()
    assert "vol-stray" not in agent.volume_mounts()
    assert not stray.exists()
    views = await FuseHostClient(agent.state_dir / "run" / "fusehost.sock").list()
    assert {tuple(v["path"]) for v in views} == {
        ("kernels", "k1", "a"), ("kernels", "k2", "a"), ("kernels", "k3", "a"),
        ("kernels", "k3", "b")}


async def test_a_view_that_cannot_be_restored_makes_the_agent_degraded(
        agent: AgentHarness) -> None:
    import shutil

    await export_three(agent)
    agent.kill()
    agent.kill_fusehost()
    shutil.rmtree(agent.sources["vol2"] / "vf-b")  # removed behind the agent's back
    agent.start()
    async with agent.client() as http:
        health = await http.get("/v1/health")
        assert health.status_code == 503
        assert health.json()["status"] == "degraded"
        assert list(health.json()["unrestored_views"]) == ["kernels/k3/b"]
        assert (agent.fuse_path("k1", "a")).is_dir()  # the others are back
        # the same export again, once the directory is back, restores the view
        (agent.sources["vol2"] / "vf-b").mkdir()
        again = await http.put("/v1/kernels/k3", json=body(
            posix("a", path="vf-a"), posix("b", volume="vol2", path="vf-b")))
        assert again.status_code == 200, again.text
        assert (agent.fuse_path("k3", "b")).is_dir()
        assert (await http.get("/v1/health")).status_code == 200
        assert (await http.delete("/v1/kernels/k3")).status_code == 204
        health = await http.get("/v1/health")
        assert health.status_code == 200, health.text
    assert agent.volume_mounts() == ["datasets", "vol1"]
