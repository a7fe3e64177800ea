"""Whole-program load test: hundreds of kernels exported and unexported at once.

Concurrent exports and unexports of kernels sharing volumes and vfolders
must leave exact refcounts, exactly the views of the live kernels, and no
mount that no kernel uses.  (Latency is measured by bench/agent_export.py,
not asserted here.)
"""
# ruff: noqa: F811 - pytest fixtures are imported by name and requested by name

from __future__ import annotations

import trio

from agentd.fuseclient import FuseHostClient
from tests.support.agent import AgentHarness, agent  # noqa: F401
from tests.test_t5_agent_exports import body, posix

KERNELS = 200
VFOLDERS = 20


def request_for(i: int) -> dict:
    vfolders = [posix("data", path=f"vf-{i % VFOLDERS}", mode="ro" if i % 2 else "rw")]
    if i % 3 == 0:
        vfolders.append(posix("extra", volume="vol2", path="vf-shared"))
    return body(*vfolders)


async def refs_and_views(agent: AgentHarness) -> tuple[dict[str, int], set[tuple[str, ...]]]:
    async with agent.client() as http:
        volumes = (await http.get("/v1/volumes")).json()["volumes"]
    views = await FuseHostClient(agent.state_dir / "run" / "fusehost.sock").list()
    return ({v["name"]: v["refcount"] for v in volumes if v["mounted"]},
            {tuple(v["path"]) for v in views})


def expected(live: set[int]) -> tuple[dict[str, int], set[tuple[str, ...]]]:
    refs = {"datasets": 0}
    views = set()
    for i in live:
        refs["vol1"] = refs.get("vol1", 0) + 1
        views.add(("kernels", f"k{i}", "data"))
        if i % 3 == 0:
            refs["vol2"] = refs.get("vol2", 0) + 1
            views.add(("kernels", f"k{i}", "extra"))
    return refs, views


async def test_many_kernels_created_and_destroyed_concurrently(agent: AgentHarness) -> None:
    for n in range(VFOLDERS):
        agent.vfolder("vol1", f"vf-{n}")
    agent.vfolder("vol2", "vf-shared")
    failures: list[str] = []

    async def put(http, i: int) -> None:
        r = await http.put(f"/v1/kernels/k{i}", json=request_for(i))
        if r.status_code != 200:
            failures.append(f"PUT k{i}: {r.status_code} {r.text}")

    async def delete(http, i: int) -> None:
        r = await http.delete(f"/v1/kernels/k{i}")
        if r.status_code != 204:
            failures.append(f"DELETE k{i}: {r.status_code} {r.text}")

    async with agent.client(timeout=120) as http:
        async with trio.open_nursery() as nursery:
            for i in range(KERNELS):
                nursery.start_soon(put, http, i)
        assert failures == []
        live = set(range(KERNELS))
        assert await refs_and_views(agent) == expected(live)

        # destroy half while creating as many new ones, and repeat some requests
        async with trio.open_nursery() as nursery:
            for i in range(0, KERNELS, 2):
                nursery.start_soon(delete, http, i)
                nursery.start_soon(put, http, KERNELS + i)
                nursery.start_soon(put, http, i + 1)  # same body again: idempotent
        assert failures == []
        live = {i for i in live if i % 2} | {KERNELS + i for i in range(0, KERNELS, 2)}
        assert await refs_and_views(agent) == expected(live)
        listed = (await http.get("/v1/kernels")).json()["kernels"]
        assert {k["kernel_id"] for k in listed} == {f"k{i}" for i in live}

        async with trio.open_nursery() as nursery:
            for i in live:
                nursery.start_soon(delete, http, i)
        assert failures == []

    assert await refs_and_views(agent) == ({"datasets": 0}, set())
    assert agent.volume_mounts() == ["datasets"]
    assert agent.mounts() == sorted([str(agent.mountpoint),
                                     str(agent.state_dir / "volumes" / "datasets"),
                                     str(agent.state_dir / "homes")])  # no kernel home left
    assert not (agent.mountpoint / "kernels").exists()
