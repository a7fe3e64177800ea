#!/usr/bin/env python3
"""Manager API: vfolder create / info / list throughput and latency, SQLite vs PostgreSQL.

One run starts ``azfs-managerd`` twice on loopback — on its embedded SQLite
file (``synchronous=FULL``) and on a PostgreSQL 15 server started here (with
``fsync=on``, unlike the tests' server, so that both pay for durability) — with
one ``bind`` host volume on local disk, and drives each with the same load
from ``--clients`` concurrent HTTP clients (httpx, keep-alive):

* create: ``POST /v1/vfolders`` of --creates distinct aliases (each makes a
  directory on the volume and commits a row);
* info: ``GET /v1/vfolders/{id}`` on random vfolders (row + usage ledger read);
* list: ``GET /v1/vfolders`` of a user owning --list-size vfolders.

Prints requests/s, p50 and p99 latency per database and the ratio
PostgreSQL/SQLite (throughput ratio; >1 means PostgreSQL is faster).  Never
run by the test suite.

    .venv/bin/python bench/manager_api.py [--creates 500] [--reads 2000] [--clients 16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.postgres import running_postgres  # noqa: E402
from tests.support.services import free_port, running  # noqa: E402

BIN = Path(sys.executable).parent


@contextlib.contextmanager
def manager(workdir: Path, database_url: str) -> Iterator[tuple[str, str]]:
    """Runs azfs-managerd on ``database_url``; yields (url, admin token)."""
    workdir.mkdir(parents=True)
    volume = workdir / "vol"
    volume.mkdir()
    (workdir / "volumes.yaml").write_text(
        f"volumes:\n  - {{name: vol, mount: {{at: requested, fstype: bind, path: {volume}}}}}\n")
    port = free_port()
    config = workdir / "managerd.toml"
    config.write_text(f'listen = "127.0.0.1:{port}"\nstate_dir = "{workdir / "state"}"\n'
                      f'volumes_file = "{workdir / "volumes.yaml"}"\nlog_level = "WARNING"\n')
    env = {**os.environ, "AZFS_MANAGERD_DATABASE_URL": database_url}
    base = [str(BIN / "azfs-managerd"), "--config", str(config)]
    out = subprocess.run([*base, "create-user", "bench", "--admin"], env=env, check=True,
                         capture_output=True, text=True)
    token = json.loads(out.stdout)["token"]
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/v1/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    with running(base, workdir / "managerd.log", healthy, "azfs-managerd", env=env):
        yield url, token


async def drive(url: str, token: str, requests: list[tuple[str, str, dict | None]],
                clients: int) -> tuple[float, list[float]]:
    """Sends ``requests`` from ``clients`` concurrent clients; (seconds, latencies)."""
    latencies: list[float] = []
    queue = list(reversed(requests))

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=120,
                                     headers={"Authorization": f"Bearer {token}"}) as c:
            while queue:
                method, path, body = queue.pop()
                t0 = time.perf_counter()
                r = await c.request(method, path, json=body)
                latencies.append(time.perf_counter() - t0)
                if r.status_code >= 400:
                    raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:200]}")

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(worker)
    return time.perf_counter() - start, latencies


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def measure(url: str, token: str, args: argparse.Namespace) -> dict[str, dict]:
    results = {}
    creates = [("POST", "/v1/vfolders", {"alias": f"b{i}"}) for i in range(args.creates)]
    seconds, lat = await drive(url, token, creates, args.clients)
    results["create"] = {"n": len(lat), "rps": len(lat) / seconds, "p50": pct(lat, 50),
                         "p99": pct(lat, 99)}
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"},
                                 timeout=120) as c:
        ids = [v["id"] for v in (await c.get("/v1/vfolders")).json()]
    rng = random.Random(7)
    infos = [("GET", f"/v1/vfolders/{rng.choice(ids)}", None) for _ in range(args.reads)]
    seconds, lat = await drive(url, token, infos, args.clients)
    results["info"] = {"n": len(lat), "rps": len(lat) / seconds, "p50": pct(lat, 50),
                       "p99": pct(lat, 99)}
    lists = [("GET", "/v1/vfolders", None) for _ in range(max(50, args.reads // 10))]
    seconds, lat = await drive(url, token, lists, args.clients)
    results["list"] = {"n": len(lat), "rps": len(lat) / seconds, "p50": pct(lat, 50),
                       "p99": pct(lat, 99), "items": len(ids)}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--creates", type=int, default=500)
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (the manager bind-mounts its host volume)", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="azfs-bench-mgr-"))
    results: dict[str, dict] = {}
    try:
        with manager(workdir / "sqlite", f"sqlite:///{workdir / 'manager.db'}") as (url, tok):
            results["sqlite"] = trio.run(measure, url, tok, args)
        with running_postgres(fsync=True) as pg, \
                manager(workdir / "pg", pg.new_database()) as (url, tok):
            results["postgresql"] = trio.run(measure, url, tok, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}; clients={args.clients}")
    print(f"{'operation':10} {'database':11} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for op in ("create", "info", "list"):
        for db in ("sqlite", "postgresql"):
            r = results[db][op]
            print(f"{op:10} {db:11} {r['rps']:8.0f} {r['p50'] * 1000:8.1f} "
                  f"{r['p99'] * 1000:8.1f}")
        ratio = results["postgresql"][op]["rps"] / results["sqlite"][op]["rps"]
        print(f"{op:10} {'pg/sqlite':11} {ratio:8.2f}x")
    print(f"list returns {results['sqlite']['list']['items']} vfolders per call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
