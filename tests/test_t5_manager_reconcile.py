"""Reconciling the manager's kernel records with a real agent's journal, in-process.

A real ``azfs-agentd`` (its own FUSE mount and journal) and a manager on a
real SQLite file; the records are put in the states a crash or a lost node
leaves behind, then the reconcile and the undo of stale creates run:

* running in the records, missing on the agent -> ``gone``, vfolder free;
* ``destroying`` in the records, missing on the agent -> forgotten;
* exported on the agent, unknown to the records -> unexported;
* ``creating`` -> left alone by the reconcile; undone by the stale-create
  undo only once older than its ``min_age``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import trio
from sqlalchemy import update

from managerd.app import create_app
from managerd.config import AgentConfig, ManagerConfig
from managerd.db.models import Kernel, now
from managerd.services.users import create_user
from managerd.state import Manager
from tests.support.agent import AgentHarness, agent  # noqa: F401
from tests.test_t5_manager_api import _serve, _unmount_under


@contextlib.asynccontextmanager
async def manager_for(root: Path, node: AgentHarness) -> AsyncIterator[tuple[Manager, str,
                                                                           str]]:
    """A manager (SQLite) whose agent ``node1`` is ``node``; (manager, url, token)."""
    root.mkdir()
    volumes = root / "volumes.yaml"
    volumes.write_text("volumes:\n  - name: vol1\n    mount: {at: requested, fstype: bind, "
                       f"path: {node.sources['vol1']}}}\n")
    manager = Manager(ManagerConfig(
        state_dir=root / "state", database_url=f"sqlite:///{root / 'm.db'}",
        volumes_file=volumes, agents={"node1": AgentConfig("node1", socket=node.socket)}))
    try:
        async with trio.open_nursery() as nursery:
            await manager.start()
            stop, binds = await _serve(nursery, create_app(manager), "127.0.0.1:0")
            _, token = manager.db.call(lambda s: create_user(s, "olive"))
            try:
                yield manager, f"http://{binds[0].removeprefix('http://')}", token
            finally:
                stop.set()
    finally:
        with trio.move_on_after(10) as scope:
            scope.shield = True
            await manager.close()
        _unmount_under(root)


def _set(manager, kernel_id: str, **values) -> None:
    manager.db.call(lambda s: s.execute(update(Kernel).where(Kernel.id == kernel_id)
                                        .values(**values)))


async def _held(node: AgentHarness) -> set[str]:
    async with node.client() as http:
        return {k["kernel_id"] for k in (await http.get("/v1/kernels")).json()["kernels"]}


async def test_reconcile_with_the_agents_journal(tmp_path: Path, agent) -> None:  # noqa: F811
    async with manager_for(tmp_path / "manager", agent) as (m, url, token):
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as c:
            ids = {}
            for alias in ("run", "half", "stale", "fresh"):
                r = await c.post("/v1/vfolders", json={"alias": alias, "volume": "vol1"})
                assert r.status_code == 201, r.text
                ids[alias] = r.json()["id"]
                r = await c.post("/v1/kernels", json={
                    "kernel_id": f"k-{alias}", "agent": "node1", "dotfolders": False,
                    "vfolders": [{"vfolder": alias}]})
                assert r.status_code == 201, r.text

            # a destroy that died between the agent's answer and the record's removal
            async with agent.client() as http:
                assert (await http.delete("/v1/kernels/k-half")).status_code == 204
                # an export the records do not know (forgotten while the node was away)
                r = await http.put("/v1/kernels/k-stray", json={"uid": 1000, "gid": 1000,
                                                                "vfolders": []})
                assert r.status_code == 200, r.text
            _set(m, "k-half", status="destroying")
            # creates left in flight: one by a crashed manager long ago, one just now
            _set(m, "k-stale", status="creating", created_at=now() - timedelta(hours=1))
            _set(m, "k-fresh", status="creating")

            outcome = await m.reconciler.reconcile("node1")
            assert (outcome.gone, outcome.forgotten, outcome.unexported) == (
                [], ["k-half"], ["k-stray"])
            assert (await c.get("/v1/kernels/k-half")).status_code == 404
            assert (await c.get(f"/v1/vfolders/{ids['half']}")).json()["status"] == "ready"
            assert await _held(agent) == {"k-run", "k-stale", "k-fresh"}

            await m.kernels.recover(min_age=600)  # only creates older than 10 minutes
            assert await _held(agent) == {"k-run", "k-fresh"}
            assert (await c.get("/v1/kernels/k-stale")).status_code == 404
            assert (await c.get(f"/v1/vfolders/{ids['stale']}")).json()["status"] == "ready"
            assert (await c.get("/v1/kernels/k-fresh")).json()["status"] == "creating"

            # the node lost a running kernel
            async with agent.client() as http:
                assert (await http.delete("/v1/kernels/k-run")).status_code == 204
            outcome = await m.reconciler.reconcile("node1")
            assert (outcome.gone, outcome.forgotten, outcome.unexported) == (["k-run"], [], [])
            assert (await c.get("/v1/kernels/k-run")).json()["status"] == "gone"
            assert (await c.get(f"/v1/vfolders/{ids['run']}")).json()["status"] == "ready"
            again = await m.reconciler.reconcile("node1")  # nothing left to change
            assert (again.gone, again.forgotten, again.unexported) == ([], [], [])

            # a gone kernel's id may be used again
            r = await c.post("/v1/kernels", json={
                "kernel_id": "k-run", "agent": "node1", "dotfolders": False,
                "vfolders": [{"vfolder": "run"}]})
            assert r.status_code == 201, r.text
            assert (await c.get(f"/v1/vfolders/{ids['run']}")).json()["status"] == "mounted"
            for kernel_id in ("k-run", "k-fresh"):
                _set(m, kernel_id, status="running")
                assert (await c.delete(f"/v1/kernels/{kernel_id}")).status_code == 204
            assert await _held(agent) == set()
