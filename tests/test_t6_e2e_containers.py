"""End to end: kernels as real runc containers on a real agent's exports.

A real ``azfs-agentd`` (bind volumes on temp dirs, its fusehost), a real
Azurite holding a blob dataset, and busybox containers run by runc as uid
1000 with the agent's OCI ``mounts`` applied under ``/home/work``.  The agent
is killed with SIGKILL while both kernels run; the containers keep working
and the restarted agent reports the same exports.
"""
# ruff: noqa: F811 - pytest fixtures are imported by name and requested by name

from __future__ import annotations

import os
from pathlib import Path

from azfs.containers.runc import KernelContainer, Runc
from azfs.export import ExportResponse
from tests.support.agent import AgentHarness, agent  # noqa: F401
from tests.support.azurite import azurite  # noqa: F401
from tests.support.containers import (  # noqa: F401
    busybox_rootfs_fixture,
    container_id,
    mountpoints_under,
    runc_fixture,
)

EROFS = os.strerror(30)
DATASET = {"train/a.bin": b"a" * 5000, "readme": b"hello dataset\n"}


def _vfolder(alias: str, path: str, mode: str) -> dict:
    return {"alias": alias, "volume": "vol1", "path": path, "mode": mode,
            "vfolder_id": f"vf-{path}"}


def _dataset(azurite) -> dict:
    return {"alias": "ds", "kind": "blob", "mode": "ro", "vfolder_id": "dataset-e2e",
            "dataset": {"url": azurite.container_url("e2e"),
                        "sas": azurite.container_sas("e2e")}}


def _start(runc: Runc, rootfs: Path, workdir: Path, export: ExportResponse
           ) -> KernelContainer:
    return KernelContainer(rootfs, export, ["sleep", "3600"], runc=runc,
                           bundle_dir=workdir / f"bundle-{export.kernel_id}",
                           scratch_dir=workdir / f"scratch-{export.kernel_id}")


async def _export(agent: AgentHarness, kernel_id: str, body: dict) -> ExportResponse:
    async with agent.client() as http:
        r = await http.put(f"/v1/kernels/{kernel_id}", json=body)
    assert r.status_code == 200, r.text
    return ExportResponse.model_validate(r.json())


async def _exports(agent: AgentHarness) -> dict[str, list]:
    async with agent.client() as http:
        kernels = (await http.get("/v1/kernels")).json()["kernels"]
    return {k["kernel_id"]: k["mounts"] for k in kernels}


async def _refcounts(agent: AgentHarness) -> dict[str, int]:
    async with agent.client() as http:
        volumes = (await http.get("/v1/volumes")).json()["volumes"]
    return {v["name"]: v["refcount"] for v in volumes if v["mounted"]}


async def _unexport(agent: AgentHarness, kernel_id: str) -> None:
    async with agent.client() as http:
        assert (await http.delete(f"/v1/kernels/{kernel_id}")).status_code == 204


async def test_two_kernels_share_a_vfolder_and_survive_an_agent_crash(
        agent: AgentHarness, azurite, busybox_rootfs: Path, runc: Runc,
        tmp_path: Path) -> None:
    azurite.upload("e2e", DATASET)
    shared = agent.vfolder("vol1", "shared")
    id1, id2 = container_id("k1"), container_id("k2")
    body1 = {"uid": 1000, "gid": 1000,
             "vfolders": [_vfolder("data", "shared", "rw"), _dataset(azurite)]}
    body2 = {"uid": 1000, "gid": 1000, "vfolders": [_vfolder("data", "shared", "ro")]}

    # kernel 1: writes into its rw vfolder, reads the blob dataset
    export1 = await _export(agent, id1, body1)
    k1 = _start(runc, busybox_rootfs, tmp_path, export1)
    r = k1.sh("id -u && mkdir -p /home/work/data/sub && echo from-k1 > /home/work/data/x "
              "&& stat -c %u /home/work/data/x && wc -c < /home/work/ds/train/a.bin "
              "&& cat /home/work/ds/readme && echo scratch > /home/work/notes")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.split() == ["1000", "1000", "5000", "hello", "dataset"]
    assert (shared / "x").read_text() == "from-k1\n"
    assert (k1.scratch / "notes").read_text() == "scratch\n"
    for read_only in ("/home/work/ds", "/home/work/datasets"):  # dataset, startup volume
        r = k1.sh(f"ls {read_only} >/dev/null && echo no > {read_only}/new")
        assert r.exit_code != 0 and EROFS in r.stderr, (read_only, r.stderr)

    # kernel 2: the same vfolder shared read-only
    k2 = _start(runc, busybox_rootfs, tmp_path, await _export(agent, id2, body2))
    r = k2.sh("cat /home/work/data/x")
    assert (r.exit_code, r.stdout) == (0, "from-k1\n"), r.stderr
    for attempt in ("echo no > /home/work/data/y", "echo no >> /home/work/data/x",
                    "rm /home/work/data/x", "mkdir /home/work/data/d"):
        r = k2.sh(attempt)
        assert r.exit_code != 0 and EROFS in r.stderr, (attempt, r.stderr)
    assert not (shared / "y").exists() and not (shared / "d").exists()
    assert (shared / "x").read_text() == "from-k1\n"

    # kill -9 the agent: running containers never notice
    before = await _exports(agent)
    assert set(before) == {id1, id2}
    refs = await _refcounts(agent)
    assert refs["vol1"] == 2
    agent.kill()
    r = k1.sh("echo while-agent-dead > /home/work/data/x && cat /home/work/ds/readme")
    assert (r.exit_code, r.stdout) == (0, "hello dataset\n"), r.stderr
    r = k2.sh("cat /home/work/data/x")
    assert (r.exit_code, r.stdout) == (0, "while-agent-dead\n"), r.stderr
    assert k1.status() == k2.status() == "running"

    # the restarted agent has the same exports; the same request is idempotent
    agent.start("--unmount-on-exit")
    assert await _exports(agent) == before
    assert await _refcounts(agent) == refs
    assert (await _export(agent, id1, body1)).model_dump() == export1.model_dump()
    assert await _refcounts(agent) == refs
    r = k1.sh("echo after-restart > /home/work/data/x")
    assert r.exit_code == 0, r.stderr

    # destroying kernel 1 leaves kernel 2's view working
    k1.stop()
    await _unexport(agent, id1)
    r = k2.sh("cat /home/work/data/x && ls /home/work/data")
    assert (r.exit_code, r.stdout) == (0, "after-restart\nsub\nx\n"), r.stderr
    assert (await _refcounts(agent))["vol1"] == 1
    assert "vol1" in agent.volume_mounts()

    # destroying kernel 2 unmounts the requested volume
    k2.stop()
    assert k2.status() == "absent"
    await _unexport(agent, id2)
    assert await _exports(agent) == {}
    assert "vol1" not in agent.volume_mounts()
    assert runc.list() == []

    # the agent's exit (decommissioning) leaves nothing in the mount table
    assert agent.stop() == 0
    assert mountpoints_under(tmp_path) == []
    with open("/proc/mounts") as f:
        table = f.read()
    assert str(tmp_path) not in table and id1 not in table and id2 not in table
    assert (shared / "x").read_text() == "after-restart\n"
