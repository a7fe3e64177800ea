"""Benchmark of the cluster control path: kernel creates and destroys through the managers.

Starts a real cluster on this machine (PostgreSQL with fsync on, etcd, three
``azfs-agentd`` with their fusehosts mounting one shared ``bind`` volume, two
``azfs-managerd``), gives each kernel a vfolder of its own, and measures
``POST /v1/kernels`` then ``DELETE /v1/kernels/{id}`` (p50, p99, max, and the
wall time of the whole batch):

* **cluster**: all kernels at once, spread round-robin over the three agents,
  each request sent to one of the two managers in turn;
* **peer, one node**: the same batch, all on one agent through one manager
  (the single-agent case of ``bench/agent_export.py``, here with the manager
  in front).

Usage (as root)::

    .venv/bin/python bench/cluster_exports.py [--kernels 200]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.cluster import Cluster  # noqa: E402
from tests.support.etcd import EtcdServer  # noqa: E402
from tests.support.postgres import running_postgres  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def call(client: httpx.AsyncClient, phase: str, kernel_id: str, agent: str,
               vfolder: str, latencies: list[float], failures: list[str]) -> None:
    start = time.perf_counter()
    if phase == "create":
        r = await client.post("/v1/kernels", json={
            "kernel_id": kernel_id, "agent": agent, "dotfolders": False,
            "vfolders": [{"vfolder": vfolder}]})
        ok = r.status_code == 201
    else:
        r = await client.delete(f"/v1/kernels/{kernel_id}")
        ok = r.status_code == 204
    latencies.append(time.perf_counter() - start)
    if not ok:
        failures.append(f"{phase} {kernel_id}: {r.status_code} {r.text[:200]}")


async def batch(urls: list[str], agents: list[str], token: str, vfolders: list[str],
                tag: str) -> dict[str, tuple[list[float], float]]:
    """All creates at once, then all destroys at once; (latencies, wall time) of each."""
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=len(vfolders), max_keepalive_connections=len(vfolders))
    out: dict[str, tuple[list[float], float]] = {}
    failures: list[str] = []
    for phase in ("create", "destroy"):
        # fresh connections per phase: the managers close idle ones after 5 s
        clients = [httpx.AsyncClient(base_url=u, headers=headers, timeout=120, limits=limits)
                   for u in urls]
        latencies: list[float] = []
        try:
            began = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i, vfolder in enumerate(vfolders):
                    nursery.start_soon(call, clients[i % len(clients)], phase, f"{tag}-{i}",
                                       agents[i % len(agents)], vfolder, latencies, failures)
            out[phase] = (latencies, time.perf_counter() - began)
        finally:
            for client in clients:
                await client.aclose()
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return out


def report(title: str, results: dict[str, tuple[list[float], float]]) -> None:
    for phase, (values, wall) in results.items():
        print(f"| {title}, {phase} | {pct(values, 50) * 1000:.0f} ms | "
              f"{pct(values, 99) * 1000:.0f} ms | {max(values) * 1000:.0f} ms | "
              f"{wall:.2f} s | {len(values) / wall:.0f}/s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", type=int, default=200)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="azfs-bench-cluster-"))
    etcd = EtcdServer(root / "etcd")
    (root / "etcd").mkdir()
    try:
        etcd.start()
        with running_postgres(fsync=True) as pg, \
                Cluster(root / "cluster", pg.new_database(), etcd.endpoint) as cluster:
            token = cluster.user("bench")
            with cluster.managers[0].client(token) as c:
                vfolders = []
                for i in range(args.kernels):
                    r = c.post("/v1/vfolders", json={"alias": f"v{i}"})
                    assert r.status_code == 201, r.text
                    vfolders.append(r.json()["id"])
            urls = [m.url for m in cluster.managers]
            names = [f"node-{i}" for i in range(1, len(cluster.agents) + 1)]
            try:
                spread = trio.run(batch, urls, names, token, vfolders, "c")
                single = trio.run(batch, urls[:1], names[:1], token, vfolders, "s")
            except BaseException:
                for m in cluster.managers:
                    print(f"--- {m.name} log (tail)\n" + "\n".join(
                        m.log_text().splitlines()[-15:]), file=sys.stderr)
                raise
            print(f"\n{args.kernels} kernels at once, one vfolder each\n")
            print("| | p50 | p99 | max | wall | rate |\n|---|---|---|---|---|---|")
            report(f"{len(names)} agents, {len(urls)} managers", spread)
            report("peer: 1 agent, 1 manager", single)
    finally:
        etcd.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
