"""Blob datasets through the node agent: a second kernel, counters, refresh.

A real agent (its own process) with a block cache and its fusehost, a real
Azurite; requests over the real unix socket.  Two kernels export the same
dataset: one backend, one block cache.
"""
# ruff: noqa: F811 - pytest fixtures are imported by name and requested by name

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import trio

from agentd.fuseclient import FuseHostClient
from tests.support.agent import REPO, AgentHarness, agent  # noqa: F401
from tests.support.azurite import azurite  # noqa: F401

RNG = random.Random(5)
FILES = {f"img/c{i % 4}/{i:03d}.jpg": RNG.randbytes(RNG.choice([10, 20_000, 90_000]))
         for i in range(40)}


def export(alias: str, azurite, uid: int = 1000) -> dict:
    return {"uid": uid, "gid": 1000, "vfolders": [
        {"alias": alias, "kind": "blob", "mode": "ro", "vfolder_id": "ds-train",
         "dataset": {"url": azurite.container_url("train"),
                     "sas": azurite.container_sas("train")}}]}


def read_tree(root) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(root) for f in fs}


def expected() -> dict[str, bytes]:
    return {k[len("img/"):]: v for k, v in FILES.items()}


async def test_second_kernel_reads_from_the_node_cache_and_counters_show_it(
        agent: AgentHarness, azurite) -> None:
    agent.stop()
    agent.kill_fusehost()
    agent.write_config(cache={"dir": str(agent.root / "cache"), "size": "64M"})
    agent.start()
    azurite.upload("train", FILES)
    async with agent.client() as http:
        # k2 is another user's kernel (its own inodes); k3 the same user's second job
        for kernel, uid in (("k1", 1000), ("k2", 1001), ("k3", 1000)):
            r = await http.put(f"/v1/kernels/{kernel}", json=export("ds", azurite, uid))
            assert r.status_code == 200, r.text
        assert read_tree(agent.fuse_path("k1", "ds") / "img") == expected()

        async def datasets() -> dict:
            return (await http.get("/v1/health")).json()["fuse"]["datasets"]["ds-train"]

        first = await datasets()
        assert first["data_gets"] == len(FILES) and first["heads"] == 0
        # cache writes finish in the background: poll the fusehost, do not sleep blindly
        host = FuseHostClient(agent.state_dir / "run" / "fusehost.sock")
        with trio.fail_after(30):
            while (await host.stats())["cache"]["entries"] < len(FILES):
                await trio.sleep(0.05)
        # the second kernel: its own inodes and page cache, the node's block cache
        assert read_tree(agent.fuse_path("k2", "ds") / "img") == expected()
        second = await datasets()
        assert second["data_gets"] == first["data_gets"]  # no data GET
        assert second["cache_hits"] - first["cache_hits"] == len(FILES)
        # the third shows the files as the first does: the same inodes, so the same
        # page cache; its reads never reach the FUSE process
        for name in FILES:
            rel = name[len("img/"):]
            assert os.stat(agent.fuse_path("k3", "ds") / "img" / rel).st_ino == \
                os.stat(agent.fuse_path("k1", "ds") / "img" / rel).st_ino
        reads = (await host.stats())["fs"]["ops"]["read"]["count"]
        assert read_tree(agent.fuse_path("k3", "ds") / "img") == expected()
        assert (await host.stats())["fs"]["ops"]["read"]["count"] == reads
        assert (await datasets())["cache_hits"] == second["cache_hits"]
        metrics = (await http.get("/metrics")).text
        assert f'azfs_blob_http_requests_total{{dataset="ds-train",kind="get"}} ' \
               f'{len(FILES)}.0' in metrics
        assert f'azfs_blob_cache_served_blocks_total{{dataset="ds-train"}} ' \
               f'{len(FILES)}.0' in metrics
    status = subprocess.run([sys.executable, "-m", "azfs.cli.main", "agent", "--socket",
                             str(agent.socket), "status"], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert status.returncode == 0, status.stderr
    assert f"dataset    ds-train  data GETs {len(FILES)}  HEADs 0" in status.stdout


async def test_refresh_endpoint_makes_a_new_blob_visible(agent: AgentHarness, azurite) -> None:
    azurite.upload("train", FILES)
    async with agent.client() as http:
        for kernel, uid in (("kr", 1000), ("ko", 1001)):  # ko: another user's kernel
            r = await http.put(f"/v1/kernels/{kernel}", json=export("ds", azurite, uid))
            assert r.status_code == 200, r.text
        folder = agent.fuse_path("kr", "ds") / "img" / "c0"
        other = agent.fuse_path("ko", "ds") / "img" / "c0"
        before = sorted(os.listdir(folder))
        for probe in (folder, other):
            with pytest.raises(FileNotFoundError):  # a negative entry, kept for the TTL
                os.stat(probe / "new.jpg")
        azurite.upload("train", {"img/c0/new.jpg": b"new"})
        try:
            assert sorted(os.listdir(folder)) == before  # the cached listing (a minute)
            r = await http.post("/v1/kernels/kr/refresh")
            assert r.status_code == 200, r.text
            assert r.json()["refreshed"] == ["ds"]
            assert "new.jpg" in os.listdir(folder)
            assert os.stat(folder / "new.jpg").st_size == 3
            assert (folder / "new.jpg").read_bytes() == b"new"
            # one backend for the dataset: the refresh through kr reached ko's views too,
            # its negative entry included
            assert os.stat(other / "new.jpg").st_size == 3
            missing = await http.post("/v1/kernels/nope/refresh")
            assert missing.status_code == 404
            assert missing.json()["error"]["code"] == "kernel-not-found"
        finally:
            azurite.service_client().get_container_client("train").delete_blob(
                "img/c0/new.jpg")


async def test_kernels_share_a_dataset_backend_each_with_a_sas_that_reads_it(
        agent: AgentHarness, azurite) -> None:
    azurite.upload("train", FILES)
    host = FuseHostClient(agent.state_dir / "run" / "fusehost.sock")
    async with agent.client() as http:
        r = await http.put("/v1/kernels/ka", json=export("ds", azurite))
        assert r.status_code == 200, r.text
        backends = (await host.call("list"))["backends"]
        # a kernel whose own SAS does not read the dataset is refused, not let in on
        # the SAS of the kernel already reading it
        forged = export("ds", azurite)
        sas = forged["vfolders"][0]["dataset"]["sas"]
        forged["vfolders"][0]["dataset"]["sas"] = sas.replace("sig=", "sig=AAAA")
        r = await http.put("/v1/kernels/kb", json=forged)
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"] == "dataset-unavailable"
        assert "sig=" not in r.text
        assert not agent.fuse_path("kb", "ds").exists()
        # another kernel with its own (fresh) SAS joins the same backend
        r = await http.put("/v1/kernels/kc", json=export("ds", azurite))
        assert r.status_code == 200, r.text
        assert (await host.call("list"))["backends"] == backends
        assert read_tree(agent.fuse_path("kc", "ds") / "img") == expected()
        # the first kernel goes: the dataset stays open for the other
        assert (await http.delete("/v1/kernels/ka")).status_code == 204
        assert read_tree(agent.fuse_path("kc", "ds") / "img") == expected()
        assert (await http.delete("/v1/kernels/kc")).status_code == 204
        assert (await host.call("list"))["backends"] == backends - 1
