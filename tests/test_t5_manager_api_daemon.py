"""The whole ``azfs-managerd`` program: restarts lose nothing; the ``azfs`` CLI against it.

The daemon runs as a subprocess on a free loopback port with a real SQLite
file or a real PostgreSQL 15, ``bind`` host volumes of temp dirs.  It is
killed with SIGKILL (a crash) and stopped with SIGTERM, and restarted on the
same database: every acknowledged change must still be there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.postgres import postgres  # noqa: F401
from tests.support.services import free_port, running
from tests.test_t5_manager_api import _unmount_under, tmp_dir  # noqa: F401

BIN = Path(sys.executable).parent


class Daemon:
    def __init__(self, tmp: Path, database_url: str) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.volume = tmp / "vol1"
        self.volume.mkdir(exist_ok=True)
        (tmp / "volumes.yaml").write_text(
            f"volumes:\n  - name: vol1\n    mount: {{at: requested, fstype: bind, "
            f"path: {self.volume}}}\n")
        self.config = tmp / "managerd.toml"
        self.config.write_text(
            f'listen = "127.0.0.1:{self.port}"\nstate_dir = "{tmp / "state"}"\n'
            f'volumes_file = "{tmp / "volumes.yaml"}"\n')
        self.env = {**os.environ, "AZFS_MANAGERD_DATABASE_URL": database_url}
        self.log = tmp / "managerd.log"

    def cmd(self, *args: str) -> list[str]:
        return [str(BIN / "azfs-managerd"), "--config", str(self.config), *args]

    def create_user(self, name: str, admin: bool = False) -> str:
        out = subprocess.run(self.cmd("create-user", name, *(["--admin"] if admin else [])),
                             env=self.env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout)["token"]

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def run(self):
        return running(self.cmd(), self.log, self.healthy, "azfs-managerd", env=self.env)

    def client(self, token: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"},
                            timeout=30)


@pytest.fixture(params=["sqlite", "postgresql"])
def daemon(request, tmp_dir) -> Iterator[Daemon]:  # noqa: F811
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres").new_database()
    else:
        url = f"sqlite:///{tmp_dir / 'managerd.db'}"
    yield Daemon(tmp_dir, url)
    _unmount_under(tmp_dir)


def _snapshot(d: Daemon, tokens: dict[str, str]) -> dict:
    out = {}
    for user, token in tokens.items():
        with d.client(token) as c:
            out[user] = {
                "vfolders": c.get("/v1/vfolders").json(),
                "trash": c.get("/v1/vfolders", params={"trash": True}).json(),
                "datasets": c.get("/v1/datasets").json(),
                "me": c.get("/v1/users/me").json(),
            }
    return out


def _mounted_under(root: Path) -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        return [line.split()[4] for line in fh if line.split()[4].startswith(str(root))]


def test_restart_loses_nothing(daemon: Daemon) -> None:
    d = daemon
    tokens = {"admin": d.create_user("admin", admin=True)}
    with d.run() as proc:
        with d.client(tokens["admin"]) as c:
            for name in ("olive", "rhea"):
                r = c.post("/v1/users", json={"name": name, "uid": 1500})
                assert r.status_code == 201
                tokens[name] = r.json()["token"]
            assert c.post("/v1/datasets", json={
                "name": "public", "account_url": "https://acct.blob.core.windows.net",
                "container": "data", "visibility": "shared"}).status_code == 201
        with d.client(tokens["olive"]) as c:
            ids = [c.post("/v1/vfolders", json={"alias": f"v{i}"}).json()["id"]
                   for i in range(20)]
            assert c.put(f"/v1/vfolders/{ids[0]}/shares/rhea",
                         json={"permission": "rw"}).status_code == 200
            assert c.delete(f"/v1/vfolders/{ids[1]}").status_code == 204
            assert c.patch(f"/v1/vfolders/{ids[2]}", json={"alias": "renamed"}).status_code \
                == 200
        with d.client(tokens["admin"]) as c:
            assert c.put(f"/v1/vfolders/{ids[3]}/quota",
                         json={"quota_bytes": 5 * 2**30}).status_code == 200
        before = _snapshot(d, tokens)
        os.killpg(proc.pid, signal.SIGKILL)  # a crash: no shutdown code runs
        proc.wait()
    with d.run() as proc:
        assert _snapshot(d, tokens) == before
        with d.client(tokens["olive"]) as c:
            assert c.post("/v1/vfolders", json={"alias": "v0"}).status_code == 409
            assert c.post("/v1/vfolders", json={"alias": "after"}).status_code == 201
        before = _snapshot(d, tokens)
    assert _mounted_under(d.tmp) == []  # SIGTERM: the manager released its volume mount
    with d.run():
        assert _snapshot(d, tokens) == before
        assert len(before["olive"]["vfolders"]) == 20
        assert {p.name for p in d.volume.iterdir()} == {
            v["path"] for v in before["olive"]["vfolders"] + before["olive"]["trash"]}


def _azfs(d: Daemon, token: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "AZFS_MANAGER_URL": d.url, "AZFS_TOKEN": token, "COLUMNS": "200"}
    return subprocess.run([str(BIN / "azfs"), *args], env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("daemon", ["sqlite"], indirect=True)
def test_cli_folder_and_kernel_commands(daemon: Daemon) -> None:
    d = daemon
    admin = d.create_user("admin", admin=True)
    olive = d.create_user("olive")
    d.create_user("rhea")
    with d.run():
        r = _azfs(d, olive, "folder", "create", "data", "--json")
        assert r.returncode == 0, r.stderr
        created = json.loads(r.stdout)
        assert created["alias"] == "data" and created["status"] == "ready"
        r = _azfs(d, olive, "folder", "ls")
        assert r.returncode == 0 and "data" in r.stdout and created["id"] in r.stdout
        r = _azfs(d, olive, "folder", "share", "data", "rhea", "--permission", "rw", "--json")
        assert json.loads(r.stdout)["shared_with"] == [{"user": "rhea", "permission": "rw"}]
        r = _azfs(d, olive, "folder", "info", "data", "--json")
        assert json.loads(r.stdout)["usage"] == {"bytes": 0, "files": 0}
        r = _azfs(d, olive, "folder", "info", "data")
        assert r.returncode == 0 and "rhea:rw" in r.stdout
        r = _azfs(d, admin, "folder", "quota", created["id"], "--bytes", "1000000", "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["quota_bytes"] == 1000000

        # errors: one line on stderr with the stable code, exit 1, no traceback
        r = _azfs(d, olive, "folder", "info", "nope")
        assert r.returncode == 1 and r.stderr.count("\n") == 1
        assert "[vfolder-not-found]" in r.stderr and "Traceback" not in r.stderr
        r = _azfs(d, olive, "folder", "create", "a/b")
        assert r.returncode == 1 and "[invalid-argument]" in r.stderr
        r = _azfs(d, "wrong-token", "folder", "ls")
        assert r.returncode == 1 and "[unauthenticated]" in r.stderr
        r = _azfs(d, olive, "kernel", "create", "k1", "--agent", "missing", "-v", "data:src:ro")
        assert r.returncode == 1 and "[agent-not-found]" in r.stderr
        r = _azfs(d, olive, "kernel", "rm", "k1")
        assert r.returncode == 0  # destroying an unknown kernel is fine
        r = _azfs(d, olive, "kernel", "ls", "--json")
        assert r.returncode == 0 and json.loads(r.stdout) == []

        r = _azfs(d, olive, "folder", "rm", "data", "--purge")
        assert r.returncode == 0 and "purged" in r.stdout
        assert list(d.volume.iterdir()) == []
        r = _azfs(d, olive, "folder", "ls", "--json")
        assert json.loads(r.stdout) == []
    env_url = {**os.environ, "AZFS_MANAGER_URL": d.url, "AZFS_TOKEN": olive}
    r = subprocess.run([str(BIN / "azfs"), "folder", "ls"], env=env_url, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "cannot reach the manager" in r.stderr
    assert olive not in r.stderr
