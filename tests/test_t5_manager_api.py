"""The manager's REST API over real HTTP: vfolder lifecycle, names, concurrency, kernels.

The app is served by hypercorn (trio worker) on a free 127.0.0.1 port in the
test's own trio loop and reached with httpx; the database is a real SQLite
file or a real PostgreSQL 15 server; host volumes are ``bind`` volumes of
temp directories, mounted by the manager through the library's host mounter.

Where a test is about the manager-agent contract (exports, unexports, the
agent's failures, TCP with the shared secret) the manager talks to a real
``azfs-agentd`` (``tests/support/agent.py``) that shares its host volumes.
Tests that inspect the exact body the manager sends use :class:`FakeAgent`, a
small FastAPI app on a real unix socket that records every request and
answers as the real agent does (its codes and statuses).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from azfs.export import ExportRequest
from azfs.secret import Secret
from managerd.app import create_app
from managerd.config import AgentConfig, ManagerConfig
from managerd.services.users import create_user
from managerd.state import Manager
from tests.support.agent import AgentHarness
from tests.support.azurite import ACCOUNT, KEY
from tests.support.postgres import postgres  # noqa: F401
from tests.support.services import free_port

# -- fixtures -------------------------------------------------------------------


@dataclass
class FakeAgent:
    """Stands in for a node agent: records requests on its unix socket, answers per contract."""

    socket: Path
    requests: list[tuple[str, str, Any]] = field(default_factory=list)
    exports: dict[str, ExportRequest] = field(default_factory=dict)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.put("/v1/kernels/{kernel_id}")
        async def put(kernel_id: str, request: Request) -> Any:
            body = await request.json()
            self.requests.append(("PUT", kernel_id, body))
            export = ExportRequest.model_validate(body)
            self.exports[kernel_id] = export
            return {"kernel_id": kernel_id, "mounts": [
                {"destination": v.container_path, "type": "bind",
                 "source": f"/run/azfs/fuse/kernels/{kernel_id}/{v.alias}",
                 "options": ["rbind", v.mode]} for v in export.vfolders]}

        @app.put("/v1/kernels/{kernel_id}/vfolders/{alias}")
        async def attach(kernel_id: str, alias: str, request: Request) -> Any:
            body = await request.json()
            self.requests.append(("PUT", f"{kernel_id}/{alias}", body))
            if kernel_id not in self.exports:
                return JSONResponse({"error": {"code": "kernel-not-found",
                                               "message": "no kernel"}}, 404)
            return {"kernel_id": kernel_id, "mounts": [
                {"destination": "/home/work", "type": "bind",
                 "source": f"/var/lib/azfs/agent/homes/{kernel_id}",
                 "options": ["rbind", "rslave", "rw"]}]}

        @app.delete("/v1/kernels/{kernel_id}/vfolders/{alias}")
        async def detach(kernel_id: str, alias: str) -> Any:
            self.requests.append(("DELETE", f"{kernel_id}/{alias}", None))
            return JSONResponse(None, 204)

        @app.delete("/v1/kernels/{kernel_id}")
        async def delete(kernel_id: str) -> Any:
            self.requests.append(("DELETE", kernel_id, None))
            self.exports.pop(kernel_id, None)
            return Response(status_code=204)  # the real agent: 204, also when already gone

        return app


@dataclass
class Server:
    url: str
    manager: Manager
    agent: FakeAgent
    volumes: dict[str, Path]
    tokens: dict[str, str]
    backend: str

    def client(self, user: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"} if user else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30)


async def _serve(nursery: trio.Nursery, app: Any, bind: str) -> tuple[trio.Event, list[str]]:
    config = HypercornConfig()
    config.bind = [bind]
    config.accesslog = None
    config.errorlog = None
    stop = trio.Event()
    binds = await nursery.start(
        lambda task_status: serve(app, config, shutdown_trigger=stop.wait,
                                  task_status=task_status))
    return stop, binds


def _unmount_under(root: Path) -> None:
    """Safety net: lazily unmounts anything a failed test left mounted under ``root``."""
    with open("/proc/self/mountinfo") as fh:
        points = [line.split()[4] for line in fh]
    for point in sorted((p for p in points if p.startswith(str(root))), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


@contextlib.asynccontextmanager
async def running_manager(tmp: Path, database_url: str, backend: str,
                          volumes: int = 2, node: AgentHarness | None = None,
                          **extra: Any) -> AsyncIterator[Server]:
    """A manager on ``tmp``; agent ``node1`` is ``node`` (a real agent) or a FakeAgent."""
    vol_dirs = {f"vol{i}": tmp / f"vol{i}" for i in range(1, volumes + 1)}
    if node is not None:
        vol_dirs["vol1"] = node.sources["vol1"]  # the agent exports from the same directory
    for path in vol_dirs.values():
        path.mkdir(exist_ok=True)
    volumes_file = tmp / "volumes.yaml"
    volumes_file.write_text("volumes:\n" + "".join(
        f"  - name: {name}\n    mount: {{at: requested, fstype: bind, path: {path}}}\n"
        for name, path in vol_dirs.items()))
    agent = FakeAgent(tmp / "agent.sock")
    agent_socket = node.socket if node is not None else agent.socket
    config = ManagerConfig(state_dir=tmp / "state", database_url=database_url,
                           volumes_file=volumes_file, db_threads=8, storage_timeout=10,
                           agents={"node1": AgentConfig("node1", socket=agent_socket)},
                           account_keys={ACCOUNT: Secret(KEY)}, **extra)
    manager = Manager(config)
    try:
        async with trio.open_nursery() as nursery:
            await manager.start()
            agent_stop = trio.Event()
            if node is None:
                agent_stop, _ = await _serve(nursery, agent.app(), f"unix:{agent.socket}")
            app_stop, binds = await _serve(nursery, create_app(manager), "127.0.0.1:0")
            port = int(binds[0].rsplit(":", 1)[1])
            manager.kernels.public_url = f"http://127.0.0.1:{port}"
            tokens = {}
            for name, admin in [("admin", True), ("olive", False), ("rhea", False),
                                ("walt", False), ("stan", False), ("extra", False)]:
                _, tokens[name] = manager.db.call(
                    lambda s, n=name, a=admin: create_user(s, n, admin=a, uid=2000, gid=2000))
            try:
                yield Server(f"http://127.0.0.1:{port}", manager, agent, vol_dirs, tokens,
                             backend)
            finally:
                app_stop.set()
                agent_stop.set()
    finally:
        with trio.move_on_after(10) as scope:
            scope.shield = True
            await manager.close()
        _unmount_under(tmp)


@pytest.fixture
def tmp_dir() -> Any:
    path = Path(tempfile.mkdtemp(prefix="azfs-mgr-"))
    yield path
    _unmount_under(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
async def server(request, tmp_dir) -> AsyncIterator[Server]:
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres").new_database()
    else:
        url = f"sqlite:///{tmp_dir / 'manager.db'}"
    async with running_manager(tmp_dir, url, request.param) as srv:
        yield srv


@pytest.fixture
async def sqlite_server(tmp_dir) -> AsyncIterator[Server]:
    async with running_manager(tmp_dir, f"sqlite:///{tmp_dir / 'manager.db'}", "sqlite") as srv:
        yield srv


AGENT_SECRET = "s3cret-agent-for-tcp"


@pytest.fixture
def node(tmp_dir: Path) -> Any:
    """A real agent: volumes vol1 (shared with the manager) and vol2, whose source is
    missing (so mounting it fails as a dead storage server would), plus a TCP listener
    that wants the shared secret."""
    harness = AgentHarness(tmp_dir / "node", volumes={"vol1": "requested",
                                                      "vol2": "requested"})
    secret = tmp_dir / "node" / "agent.secret"
    secret.write_text(AGENT_SECRET)
    harness.tcp_port = free_port()  # type: ignore[attr-defined]
    harness.write_config(manager={"listen": f"127.0.0.1:{harness.tcp_port}",
                                  "secret_file": str(secret)})
    shutil.rmtree(harness.sources["vol2"])
    try:
        harness.start()
        yield harness
    finally:
        harness.cleanup()
    assert harness.mounts() == [], "mounts left behind after teardown"


@pytest.fixture
async def node_server(tmp_dir, node) -> AsyncIterator[Server]:
    async with running_manager(tmp_dir, f"sqlite:///{tmp_dir / 'manager.db'}", "sqlite",
                               node=node) as srv:
        yield srv


def _dirs(volume: Path) -> set[str]:
    return {p.name for p in volume.iterdir()}


def _all_dirs(srv: Server) -> set[str]:
    return set().union(*(_dirs(v) for v in srv.volumes.values()))


# -- vfolder lifecycle ----------------------------------------------------------------


async def test_vfolder_lifecycle(server: Server) -> None:
    async with server.client("olive") as c:
        r = await c.post("/v1/vfolders", json={"alias": "data"})
        assert r.status_code == 201, r.text
        vf = r.json()
        assert vf["alias"] == "data" and vf["status"] == "ready" and vf["owner"] == "olive"
        assert vf["path"] == uuid.UUID(vf["id"]).hex
        directory = server.volumes[vf["volume"]] / vf["path"]
        assert directory.is_dir()

        info = (await c.get("/v1/vfolders/data")).json()
        assert info["id"] == vf["id"]
        assert info["usage"] == {"bytes": 0, "files": 0}
        assert (await c.get(f"/v1/vfolders/{vf['id']}")).json()["alias"] == "data"

        # same alias again: 409, and no second directory
        r = await c.post("/v1/vfolders", json={"alias": "data"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "vfolder-exists"
        assert _all_dirs(server) == {vf["path"]}

        r = await c.patch("/v1/vfolders/data", json={"alias": "results"})
        assert r.status_code == 200 and r.json()["alias"] == "results"
        assert (await c.get("/v1/vfolders/data")).status_code == 404

        listed = (await c.get("/v1/vfolders")).json()
        assert [v["alias"] for v in listed] == ["results"]

        # trash (twice is fine), restore, trash, purge (twice is fine)
        assert (await c.delete("/v1/vfolders/results")).status_code == 204
        assert (await c.delete(f"/v1/vfolders/{vf['id']}")).status_code == 204
        assert (await c.get("/v1/vfolders")).json() == []
        trash = (await c.get("/v1/vfolders", params={"trash": True})).json()
        assert [v["status"] for v in trash] == ["delete-pending"]
        r = await c.post("/v1/vfolders", json={"alias": "results"})
        assert r.status_code == 409 and "trash" in r.json()["error"]["message"]
        r = await c.post(f"/v1/vfolders/{vf['id']}/restore")
        assert r.status_code == 200 and r.json()["status"] == "ready"
        r = await c.post(f"/v1/vfolders/{vf['id']}/purge")
        assert r.status_code == 409 and r.json()["error"]["code"] == "vfolder-bad-state"
        assert directory.is_dir()
        assert (await c.delete(f"/v1/vfolders/{vf['id']}")).status_code == 204
        assert (await c.post(f"/v1/vfolders/{vf['id']}/purge")).status_code == 204
        assert not directory.exists()
        assert (await c.post(f"/v1/vfolders/{vf['id']}/purge")).status_code == 204
        assert (await c.delete(f"/v1/vfolders/{vf['id']}")).status_code == 204
        r = await c.get(f"/v1/vfolders/{vf['id']}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "vfolder-not-found"
        # the alias is free again once purged
        assert (await c.post("/v1/vfolders", json={"alias": "results"})).status_code == 201


async def test_usage_comes_from_the_ledger(sqlite_server: Server) -> None:
    """Usage is read from the filesystem's ledger, not by walking; unknown is an error."""
    srv = sqlite_server
    async with srv.client("olive") as c:
        vf = (await c.post("/v1/vfolders", json={"alias": "u"})).json()
        directory = srv.volumes[vf["volume"]] / vf["path"]
        from azfs.usage import LEDGER_VERSION, META_DIR
        (directory / META_DIR / "usage.json").write_text(
            f'{{"version": {LEDGER_VERSION}, "bytes": 12345, "files": 7, "clean": true}}')
        r = await c.get(f"/v1/vfolders/{vf['id']}/usage")
        assert r.json() == {"id": vf["id"], "bytes": 12345, "files": 7}
        shutil.rmtree(directory / META_DIR)
        r = await c.get(f"/v1/vfolders/{vf['id']}/usage")
        assert r.status_code == 503 and r.json()["error"]["code"] == "usage-unavailable"
        info = (await c.get(f"/v1/vfolders/{vf['id']}")).json()
        assert info["usage"] is None and info["usage_error"]["code"] == "usage-unavailable"


async def test_usage_of_data_written_through_azfs(sqlite_server: Server, mounted) -> None:
    """Files written through a real azfs mount of the vfolder show up in info and usage."""
    srv = sqlite_server
    async with srv.client("olive") as c:
        vf = (await c.post("/v1/vfolders", json={"alias": "written"})).json()
        mount = mounted(source=srv.volumes[vf["volume"]] / vf["path"])
        (mount.mnt / "a.bin").write_bytes(b"x" * 12345)
        (mount.mnt / "d").mkdir()
        (mount.mnt / "d" / "b.txt").write_bytes(b"y" * 100)
        assert mount.umount().returncode == 0  # a clean unmount writes the final ledger
        r = await c.get(f"/v1/vfolders/{vf['id']}/usage")
        assert r.status_code == 200, r.text
        assert r.json() == {"id": vf["id"], "bytes": 12445, "files": 3}
        assert (await c.get("/v1/vfolders/written")).json()["usage"] == {"bytes": 12445,
                                                                         "files": 3}


async def test_volume_choice_most_free_and_named(sqlite_server: Server) -> None:
    srv = sqlite_server
    async with srv.client("admin") as c:
        vols = (await c.get("/v1/volumes")).json()
        assert {v["name"] for v in vols} == {"vol1", "vol2"}
        assert all(v["free_bytes"] > 0 for v in vols)
    async with srv.client("olive") as c:
        r = await c.post("/v1/vfolders", json={"alias": "a", "volume": "vol2"})
        assert r.status_code == 201 and r.json()["volume"] == "vol2"
        assert (srv.volumes["vol2"] / r.json()["path"]).is_dir()
        r = await c.post("/v1/vfolders", json={"alias": "b", "volume": "nope"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "volume-not-found"
        assert (await c.get("/v1/vfolders/b")).status_code == 404


async def test_failed_insert_leaves_no_directory(sqlite_server: Server) -> None:
    """A row that cannot be committed takes its fresh directory with it."""
    srv = sqlite_server
    from managerd.services import vfolders as service

    original = service._check_alias_free
    service._check_alias_free = lambda *a: None  # let the race reach the unique index
    try:
        async with srv.client("olive") as c:
            assert (await c.post("/v1/vfolders", json={"alias": "x"})).status_code == 201
            before = _all_dirs(srv)
            r = await c.post("/v1/vfolders", json={"alias": "x"})
            assert r.status_code == 409 and r.json()["error"]["code"] == "vfolder-exists"
            assert _all_dirs(srv) == before
    finally:
        service._check_alias_free = original


@pytest.mark.parametrize("alias,code", [
    ("", "invalid-argument"), ("a/b", "invalid-argument"), (".", "invalid-argument"),
    ("..", "invalid-argument"), ("x" * 65, "invalid-argument"), ("tab\there", "invalid-argument"),
    ("nul\x00", "invalid-argument"), (" lead", "invalid-argument"),
    (".ssh", "reserved-name"), (".bashrc", "reserved-name"),
    (str(uuid.uuid4()), "invalid-argument"), (uuid.uuid4().hex, "invalid-argument"),
])
async def test_bad_alias_is_refused_and_changes_nothing(sqlite_server: Server, alias: str,
                                                        code: str) -> None:
    async with sqlite_server.client("olive") as c:
        r = await c.post("/v1/vfolders", json={"alias": alias})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == code
        assert (await c.get("/v1/vfolders")).json() == []
    assert _all_dirs(sqlite_server) == set()


async def test_dotfolder_reserved_name_with_intent(sqlite_server: Server) -> None:
    async with sqlite_server.client("olive") as c:
        r = await c.post("/v1/vfolders", json={"alias": ".ssh", "dotfolder": True})
        assert r.status_code == 201
        r = await c.post("/v1/vfolders", json={"alias": "données ✓"})
        assert r.status_code == 201 and r.json()["alias"] == "données ✓"
        assert (await c.get("/v1/vfolders/données ✓")).status_code == 200
        # the same name in decomposed form (NFD) is the same alias, not a look-alike
        decomposed = "donne\u0301es ✓"
        r = await c.post("/v1/vfolders", json={"alias": decomposed})
        assert r.status_code == 409 and r.json()["error"]["code"] == "vfolder-exists"
        assert (await c.get(f"/v1/vfolders/{decomposed}")).status_code == 200


async def test_errors_are_json_with_codes(sqlite_server: Server) -> None:
    async with sqlite_server.client() as anon:
        r = await anon.get("/v1/vfolders")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
        r = await anon.get("/v1/vfolders", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
        r = await anon.get("/v1/nothing-here")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not-found"
        spec = (await anon.get("/openapi.json")).json()
        assert "/v1/vfolders/{ref}" in spec["paths"]
    async with sqlite_server.client("olive") as c:
        r = await c.post("/v1/vfolders", content=b"{not json",
                         headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid-argument"
        r = await c.post("/v1/vfolders", json={"alias": "a", "bogus": 1})
        assert r.status_code == 422 and "bogus" in r.json()["error"]["message"]


async def test_metrics_count_requests_and_records(sqlite_server: Server) -> None:
    async with sqlite_server.client("olive") as c:
        await c.post("/v1/vfolders", json={"alias": "m1"})
        await c.post("/v1/vfolders", json={"alias": "m2"})
        await c.delete("/v1/vfolders/m2")
        await c.get("/v1/vfolders/nope")
    async with sqlite_server.client() as anon:
        r = await anon.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'azfs_manager_vfolders{status="ready"} 1.0' in text
    assert 'azfs_manager_vfolders{status="delete-pending"} 1.0' in text
    assert ('azfs_manager_requests_total{method="POST",route="/v1/vfolders",status="201"} 2.0'
            in text)
    assert ('azfs_manager_requests_total{method="GET",route="/v1/vfolders/{ref}",status="404"}'
            ' 1.0' in text)
    assert "olive" not in text and "m1" not in text


# -- concurrency ------------------------------------------------------------------------


async def test_50_parallel_creates(server: Server) -> None:
    """50 distinct aliases → 50 rows and dirs; 50 of one alias → 1 row, 1 dir, 49 × 409."""
    results: dict[str, list[int]] = {"distinct": [], "same": []}

    async def create(c: httpx.AsyncClient, alias: str, kind: str) -> None:
        r = await c.post("/v1/vfolders", json={"alias": alias})
        results[kind].append(r.status_code)

    async with server.client("olive") as c:
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(create, c, f"p{i:02d}", "distinct")
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(create, c, "same", "same")
        listed = (await c.get("/v1/vfolders")).json()
    assert sorted(results["distinct"]) == [201] * 50
    assert sorted(results["same"]) == [201] + [409] * 49
    assert len(listed) == 51
    assert sorted(v["alias"] for v in listed) == sorted(
        [f"p{i:02d}" for i in range(50)] + ["same"])
    # every row has its directory and no directory is without a row (no orphans)
    assert _all_dirs(server) == {v["path"] for v in listed}
    for v in listed:
        assert (server.volumes[v["volume"]] / v["path"]).is_dir()


# -- kernels ------------------------------------------------------------------------------


async def test_kernel_export_and_never_delete_in_use(server: Server) -> None:
    srv = server
    async with srv.client("olive") as c:
        vf = (await c.post("/v1/vfolders", json={"alias": "work"})).json()
        await c.post("/v1/vfolders", json={"alias": ".config", "dotfolder": True})
        await c.put(f"/v1/vfolders/{vf['id']}/shares/rhea", json={"permission": "ro"})
        body = {"kernel_id": "k1", "agent": "node1",
                "vfolders": [{"vfolder": "work", "target": "src"}]}
        r = await c.post("/v1/kernels", json=body)
        assert r.status_code == 201, r.text
        kernel = r.json()
        assert kernel["status"] == "running"
        method, kid, sent = srv.agent.requests[-1]
        assert (method, kid) == ("PUT", "k1")
        export = ExportRequest.model_validate(sent)
        assert (export.uid, export.gid) == (2000, 2000)
        by_alias = {v.alias: v for v in export.vfolders}
        assert set(by_alias) == {"work", ".config"}  # dot-folders follow their owner
        assert by_alias["work"].volume == vf["volume"] and by_alias["work"].path == vf["path"]
        assert by_alias["work"].container_path == "/home/work/src"
        assert by_alias["work"].mode == "rw"
        assert {m["destination"] for m in kernel["mounts"]} == {
            "/home/work/src", "/home/work/.config"}

        # a retry of the same create is recognised; a different one is refused
        r = await c.post("/v1/kernels", json=body)
        assert r.status_code == 200 and r.json()["kernel_id"] == "k1"
        assert len(srv.agent.requests) == 1
        r = await c.post("/v1/kernels", json={**body, "vfolders": []})
        assert r.status_code == 409 and r.json()["error"]["code"] == "kernel-exists"

        assert (await c.get("/v1/vfolders/work")).json()["status"] == "mounted"
        for call in (c.delete("/v1/vfolders/work"),
                     c.patch("/v1/vfolders/work", json={"alias": "other"})):
            r = await call
            assert r.status_code == 409 and r.json()["error"]["code"] == "vfolder-in-use"

        assert (await c.delete("/v1/kernels/k1")).status_code == 204
        assert srv.agent.requests[-1][:2] == ("DELETE", "k1")
        assert (await c.delete("/v1/kernels/k1")).status_code == 204  # twice is fine
        assert (await c.get("/v1/vfolders/work")).json()["status"] == "ready"
        assert (await c.get("/v1/kernels/k1")).status_code == 404
        assert (await c.delete("/v1/vfolders/work")).status_code == 204

    async with srv.client("rhea") as c:
        r = await c.post("/v1/kernels", json={"kernel_id": "k2", "agent": "node1",
                                              "vfolders": [{"vfolder": vf["id"]}]})
        assert r.status_code == 409 and r.json()["error"]["code"] == "vfolder-bad-state"


async def test_kernel_modes_and_targets(sqlite_server: Server) -> None:
    srv = sqlite_server
    async with srv.client("olive") as c:
        vf = (await c.post("/v1/vfolders", json={"alias": "shared"})).json()
        await c.post("/v1/vfolders", json={"alias": "a"})
        await c.put("/v1/vfolders/shared/shares/rhea", json={"permission": "ro"})
        r = await c.post("/v1/kernels", json={
            "kernel_id": "k-overlap", "agent": "node1",
            "vfolders": [{"vfolder": "a", "target": "/home/work/x"},
                         {"vfolder": "shared", "target": "x/y"}]})
        assert r.status_code == 422 and "overlapping" in r.json()["error"]["message"]
        r = await c.post("/v1/kernels", json={"kernel_id": "bad/id", "agent": "node1"})
        assert r.status_code == 422
        r = await c.post("/v1/kernels", json={"kernel_id": "k3", "agent": "nowhere"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "agent-not-found"
    async with srv.client("rhea") as c:
        r = await c.post("/v1/kernels", json={"kernel_id": "k5", "agent": "node1",
                                              "vfolders": [{"vfolder": vf["id"], "mode": "rw"}]})
        assert r.status_code == 403
        r = await c.post("/v1/kernels", json={"kernel_id": "k5", "agent": "node1",
                                              "vfolders": [{"vfolder": "shared"}]})
        assert r.status_code == 201, r.text
        sent = ExportRequest.model_validate(srv.agent.requests[-1][2])
        assert [(v.alias, v.mode) for v in sent.vfolders] == [("shared", "ro")]
    async with srv.client("olive") as c:
        assert (await c.get("/v1/kernels/k5")).status_code == 404
        r = await c.delete("/v1/vfolders/shared")
        assert r.status_code == 409 and r.json()["error"]["code"] == "vfolder-in-use"
    async with srv.client("admin") as c:
        assert (await c.get("/v1/kernels/k5")).json()["owner"] == "rhea"
        assert (await c.delete("/v1/kernels/k5")).status_code == 204


async def test_dead_agent_blocks_destroy_until_admin_forces(sqlite_server: Server) -> None:
    srv = sqlite_server
    async with srv.client("admin") as admin:
        r = await admin.put("/v1/agents/node9", json={"socket": str(srv.agent.socket), "ttl": 0})
        assert r.status_code == 200
        async with srv.client("olive") as c:
            await c.post("/v1/vfolders", json={"alias": "w"})
            r = await c.post("/v1/kernels", json={"kernel_id": "k9", "agent": "node9",
                                                  "vfolders": [{"vfolder": "w"}]})
            assert r.status_code == 201, r.text
            # the node dies: its socket is gone
            await admin.put("/v1/agents/node9", json={"socket": "/nonexistent/agent.sock"})
            r = await c.delete("/v1/kernels/k9")
            assert r.status_code == 502 and r.json()["error"]["code"] == "agent-unreachable"
            assert (await c.get("/v1/vfolders/w")).json()["status"] == "mounted"
            r = await c.delete("/v1/kernels/k9", params={"force": True})
            assert r.status_code == 403
            r = await admin.delete("/v1/kernels/k9", params={"force": True})
            assert r.status_code == 204
            assert (await c.get("/v1/vfolders/w")).json()["status"] == "ready"
            # creating on an unreachable agent records nothing
            r = await c.post("/v1/kernels", json={"kernel_id": "k10", "agent": "node9",
                                                  "vfolders": [{"vfolder": "w"}]})
            assert r.status_code == 502 and r.json()["error"]["code"] == "agent-unreachable"
            assert (await c.get("/v1/kernels")).json() == []
            assert (await c.get("/v1/vfolders/w")).json()["status"] == "ready"


async def test_admin_creates_a_kernel_for_a_user(sqlite_server: Server) -> None:
    """A scheduler with an admin token starts kernels as their users: their checks, uid/gid."""
    srv = sqlite_server
    srv.manager.db.call(lambda s: create_user(s, "uma", uid=4242, gid=4343))
    async with srv.client("admin") as admin:
        r = await admin.post("/v1/users/uma/tokens", json={})
        uma = r.json()["token"]
        async with httpx.AsyncClient(base_url=srv.url, timeout=30,
                                     headers={"Authorization": f"Bearer {uma}"}) as c:
            vf = (await c.post("/v1/vfolders", json={"alias": "home"})).json()
        r = await admin.post("/v1/kernels", json={
            "kernel_id": "sched1", "agent": "node1", "owner": "uma",
            "vfolders": [{"vfolder": "home"}]})
        assert r.status_code == 201, r.text
        assert r.json()["owner"] == "uma"
        sent = ExportRequest.model_validate(srv.agent.requests[-1][2])
        assert (sent.uid, sent.gid) == (4242, 4343)
        assert sent.vfolders[0].vfolder_id == vf["id"]
        r = await admin.post("/v1/kernels", json={"kernel_id": "sched2", "agent": "node1",
                                                  "owner": "nobody"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "user-not-found"
    async with srv.client("olive") as c:
        r = await c.post("/v1/kernels", json={"kernel_id": "sched3", "agent": "node1",
                                              "owner": "uma"})
        assert r.status_code == 403


async def test_concurrent_kernels_shares_and_retries(server: Server) -> None:
    """Kernels locking the same vfolders in any order, racing shares, racing retries."""
    srv = server
    results: dict[str, list[int]] = {"kernels": [], "destroy": [], "share": [], "retry": []}

    async def call(kind: str, c: httpx.AsyncClient, method: str, path: str,
                   body: Any = None) -> None:
        r = await c.request(method, path, json=body)
        results[kind].append(r.status_code)
        if r.status_code == 409:
            assert r.json()["error"]["code"] in ("conflict", "kernel-exists"), r.text

    async with srv.client("olive") as c:
        for alias in ("a", "b", "c"):
            await c.post("/v1/vfolders", json={"alias": alias})
        orders = [["a", "b", "c"], ["c", "b", "a"], ["b", "c", "a"], ["a", "c", "b"]]
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(call, "kernels", c, "POST", "/v1/kernels", {
                    "kernel_id": f"kc{i}", "agent": "node1", "dotfolders": False,
                    "vfolders": [{"vfolder": a} for a in orders[i % 4]]})
            for _ in range(10):
                nursery.start_soon(call, "share", c, "PUT", "/v1/vfolders/a/shares/rhea",
                                   {"permission": "rw"})
        assert results["kernels"] == [201] * 20
        assert set(results["share"]) <= {200, 409} and 200 in results["share"]
        info = (await c.get("/v1/vfolders/a")).json()
        assert info["status"] == "mounted"
        assert info["shared_with"] == [{"user": "rhea", "permission": "rw"}]
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(call, "destroy", c, "DELETE", f"/v1/kernels/kc{i}")
            for _ in range(8):
                nursery.start_soon(call, "retry", c, "POST", "/v1/kernels", {
                    "kernel_id": "same", "agent": "node1", "dotfolders": False,
                    "vfolders": [{"vfolder": "c", "mode": "ro"}]})
        assert results["destroy"] == [204] * 20
        assert 201 in results["retry"] and set(results["retry"]) <= {200, 201, 409}
        assert results["retry"].count(201) == 1
        assert [r[1] for r in srv.agent.requests if r[0] == "PUT"].count("same") == 1
        statuses = {v["alias"]: v["status"] for v in (await c.get("/v1/vfolders")).json()}
        assert statuses == {"a": "ready", "b": "ready", "c": "mounted"}


async def test_slow_purge_finishes_in_the_background(sqlite_server: Server) -> None:
    """Storage slower than the timeout: 202, ``delete-ongoing``, then done by itself.

    Slow storage cannot be produced here on demand, so the directory removal
    waits for an event set by the test (a stand-in for a slow SMB server);
    everything else is real.
    """
    import threading

    from managerd.services import vfolders as service

    srv = sqlite_server
    release = threading.Event()
    real_remove = service.remove_tree

    def slow_remove(directory: Path) -> None:
        release.wait(30)
        real_remove(directory)

    service.remove_tree = slow_remove
    srv.manager.volumes.timeout = 0.2
    try:
        async with srv.client("olive") as c:
            vf = (await c.post("/v1/vfolders", json={"alias": "big"})).json()
            directory = srv.volumes[vf["volume"]] / vf["path"]
            assert (await c.delete("/v1/vfolders/big")).status_code == 204
            r = await c.post(f"/v1/vfolders/{vf['id']}/purge")
            assert r.status_code == 202 and r.json() == {"status": "delete-ongoing"}
            trash = (await c.get("/v1/vfolders", params={"trash": True})).json()
            assert [v["status"] for v in trash] == ["delete-ongoing"]
            assert directory.exists()
            release.set()
            with trio.fail_after(30):
                while (await c.get(f"/v1/vfolders/{vf['id']}")).status_code != 404:
                    await trio.sleep(0.05)
            assert not directory.exists()
            assert (await c.post("/v1/vfolders", json={"alias": "big"})).status_code == 201
    finally:
        release.set()
        service.remove_tree = real_remove


async def test_kernel_lifecycle_through_the_real_agent(node_server: Server,
                                                      node: AgentHarness) -> None:
    """Create → the agent serves the vfolder at the path it answered; destroy → gone."""
    srv = node_server
    async with srv.client("olive") as c:
        vf = (await c.post("/v1/vfolders", json={"alias": "work", "volume": "vol1"})).json()
        assert vf["volume"] == "vol1", vf
        r = await c.post("/v1/kernels", json={"kernel_id": "k1", "agent": "node1",
                                              "vfolders": [{"vfolder": "work",
                                                            "target": "src"}]})
        assert r.status_code == 201, r.text
        (mount,) = r.json()["mounts"]  # the kernel's home, its vfolders bound inside
        assert mount["destination"] == "/home/work"
        served = Path(mount["source"]) / "src"
        assert node.fuse_path("k1", "work").is_dir()
        (served / "hello.txt").write_text("through the agent")
        on_volume = node.sources["vol1"] / vf["path"] / "hello.txt"
        assert on_volume.read_text() == "through the agent"
        async with node.client() as agent_http:
            (kernel,) = (await agent_http.get("/v1/kernels")).json()["kernels"]
            assert kernel["kernel_id"] == "k1"
        assert (await c.get("/v1/vfolders/work")).json()["status"] == "mounted"
        assert (await c.delete("/v1/kernels/k1")).status_code == 204
        assert not served.exists()
        async with node.client() as agent_http:
            assert (await agent_http.get("/v1/kernels")).json()["kernels"] == []
        # the agent already forgot it: a second destroy is fine on both sides
        assert (await c.delete("/v1/kernels/k1")).status_code == 204
        assert (await c.get("/v1/vfolders/work")).json()["status"] == "ready"
        assert on_volume.read_text() == "through the agent"


async def test_agent_failure_through_the_real_agent(node_server: Server,
                                                    node: AgentHarness) -> None:
    """The agent cannot mount the vfolder's volume: 502 agent-error with the agent's
    reason, nothing recorded, the vfolder free again, and the agent left clean."""
    srv = node_server
    async with srv.client("olive") as c:
        vf = (await c.post("/v1/vfolders", json={"alias": "a", "volume": "vol2"})).json()
        assert vf["volume"] == "vol2", vf
        r = await c.post("/v1/kernels", json={"kernel_id": "k4", "agent": "node1",
                                              "vfolders": [{"vfolder": "a"}]})
        assert r.status_code == 502, r.text
        error = r.json()["error"]
        assert error["code"] == "agent-error"
        assert "answered 503" in error["message"], error
        assert (await c.get("/v1/kernels")).json() == []
        assert (await c.get("/v1/vfolders/a")).json()["status"] == "ready"
    async with node.client() as agent_http:
        assert (await agent_http.get("/v1/kernels")).json()["kernels"] == []
    assert not node.fuse_path("k4", "a").exists()


async def test_agent_over_tcp_with_shared_secret(node_server: Server,
                                                 node: AgentHarness) -> None:
    """A remote agent: TCP, and every call carries the manager's shared secret."""
    srv = node_server
    url = f"http://127.0.0.1:{node.tcp_port}"  # type: ignore[attr-defined]
    srv.manager.agents.secret = Secret(AGENT_SECRET)
    async with srv.client("admin") as admin:
        r = await admin.put("/v1/agents/remote1", json={"url": url, "ttl": 60})
        assert r.status_code == 200
    async with srv.client("olive") as c:
        await c.post("/v1/vfolders", json={"alias": "r", "volume": "vol1"})
        r = await c.post("/v1/kernels", json={"kernel_id": "kt", "agent": "remote1",
                                              "vfolders": [{"vfolder": "r"}]})
        assert r.status_code == 201, r.text
        assert node.fuse_path("kt", "r").is_dir()
        assert (await c.delete("/v1/kernels/kt")).status_code == 204
        assert not node.fuse_path("kt", "r").exists()
        srv.manager.agents.secret = Secret("wrong")
        r = await c.post("/v1/kernels", json={"kernel_id": "kt2", "agent": "remote1",
                                              "vfolders": [{"vfolder": "r"}]})
        assert r.status_code == 502 and r.json()["error"]["code"] == "agent-error"
        assert "answered 401" in r.json()["error"]["message"]
        assert "wrong" not in r.text and AGENT_SECRET not in r.text
        assert (await c.get("/v1/kernels")).json() == []
    assert AGENT_SECRET not in node.log.read_text()


async def test_dead_volume_mount_is_remounted(tmp_dir: Path, mounted) -> None:
    """The storage under a volume dies and comes back: the manager remounts, no restart.

    The volume's source is a real azfs FUSE mount; killing its daemon leaves the
    manager's bind mount of it dead (ENOTCONN), as a dropped SMB session would.
    """
    fuse = mounted(source=tmp_dir / "backing", mnt=tmp_dir / "vol1")
    async with running_manager(tmp_dir, f"sqlite:///{tmp_dir / 'm.db'}", "sqlite",
                               volumes=1) as srv:
        async with srv.client("olive") as c:
            first = (await c.post("/v1/vfolders", json={"alias": "before"})).json()
            fuse.kill()
            fuse.mount()  # the storage is back, but the manager's mount of it is dead
            r = await c.post("/v1/vfolders", json={"alias": "after"})
            assert r.status_code == 201, r.text
            second = r.json()
            assert {first["path"], second["path"]} <= {p.name for p in
                                                       (tmp_dir / "backing").iterdir()}
            # and the vfolder made before the failure is reachable through the new mount
            assert (await c.delete("/v1/vfolders/before")).status_code == 204
            assert (await c.post(f"/v1/vfolders/{first['id']}/purge")).status_code == 204
            assert first["path"] not in {p.name for p in (tmp_dir / "backing").iterdir()}
