"""Whole-program tests of azfs-agentd's control API: exports through a real FUSE mount.

A real agent (its own process) with bind volumes on temp dirs, a YAML volume
file and its fusehost; requests over the real unix socket.  Every refused
request is checked to change nothing: recorded kernels, volume refcounts,
the fusehost's views and /proc/self/mountinfo.
"""
# ruff: noqa: F811 - pytest fixtures are imported by name and requested by name

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agentd.fuseclient import FuseHostClient
from azfs.volumes.mountinfo import mounts_under
from tests.support.agent import REPO, AgentHarness, agent  # noqa: F401
from tests.support.azurite import azurite  # noqa: F401


def body(*vfolders: dict, uid: int = 1000, gid: int = 1000) -> dict:
    return {"uid": uid, "gid": gid, "vfolders": list(vfolders)}


def posix(alias: str, volume: str = "vol1", path: str | None = None, mode: str = "rw",
          **extra: object) -> dict:
    return {"alias": alias, "volume": volume, "path": path or f"vf-{alias}", "mode": mode,
            **extra}


async def snapshot(agent: AgentHarness) -> dict:
    """Everything a refused request must leave unchanged."""
    async with agent.client() as http:
        kernels = (await http.get("/v1/kernels")).json()
        volumes = (await http.get("/v1/volumes")).json()
    views = await FuseHostClient(agent.state_dir / "run" / "fusehost.sock").list()
    return {"kernels": kernels, "volumes": volumes, "views": views, "mounts": agent.mounts()}


async def test_export_read_write_and_unexport(agent: AgentHarness) -> None:
    vf = agent.vfolder("vol1", "vf-data")
    (vf / "hello.txt").write_text("hello from the volume\n")
    async with agent.client() as http:
        r = await http.put("/v1/kernels/k1", json=body(posix("data", vfolder_id="vf-1")))
        assert r.status_code == 200, r.text
        mounts = r.json()["mounts"]
        source = str(agent.fuse_path("k1", "data"))
        # the kernel's home at /home/work, rslave: the agent's binds in it reach the kernel
        home = agent.state_dir / "homes" / "k1"
        assert mounts == [{"destination": "/home/work", "type": "bind", "source": str(home),
                           "options": ["rbind", "rslave", "rw"]}]
        assert agent.mounts().count(str(home / "data")) == 1
        # the startup volume is offered read-only at /home/work/<volume name>
        assert (home / "datasets").is_dir()
        with pytest.raises(OSError) as info:
            (home / "datasets" / "x").write_text("no")
        assert info.value.errno == 30
        assert Path(home, "data", "hello.txt").read_text() == "hello from the volume\n"

        assert Path(source, "hello.txt").read_text() == "hello from the volume\n"
        st = os.stat(Path(source, "hello.txt"))
        assert (st.st_uid, st.st_gid) == (1000, 1000)
        Path(source, "new.txt").write_text("written in the kernel")
        assert (vf / "new.txt").read_text() == "written in the kernel"
        assert agent.volume_mounts() == ["datasets", "vol1"]

        listed = (await http.get("/v1/kernels")).json()["kernels"]
        assert [k["kernel_id"] for k in listed] == ["k1"]
        assert listed[0]["vfolders"][0]["alias"] == "data"
        one = await http.get("/v1/kernels/k1")
        assert one.status_code == 200 and one.json()["mounts"] == mounts
        vols = {v["name"]: v for v in (await http.get("/v1/volumes")).json()["volumes"]}
        assert vols["vol1"]["refcount"] == 1 and vols["vol1"]["mounted"]
        assert not vols["vol2"]["mounted"]

        r = await http.delete("/v1/kernels/k1")
        assert r.status_code == 204
        assert not Path(source).exists()
        assert not home.exists() and str(home) not in " ".join(agent.mounts())
        assert agent.volume_mounts() == ["datasets"]
        assert (vf / "new.txt").exists()  # unexport never touches the data
        r = await http.delete("/v1/kernels/k1")
        assert r.status_code == 204  # idempotent
        r = await http.get("/v1/kernels/k1")
        assert r.status_code == 404 and r.json()["error"]["code"] == "kernel-not-found"


async def test_same_body_is_idempotent_other_body_conflicts(agent: AgentHarness) -> None:
    agent.vfolder("vol1", "vf-a")
    agent.vfolder("vol1", "vf-b")
    async with agent.client() as http:
        first = await http.put("/v1/kernels/k1", json=body(posix("a")))
        assert first.status_code == 200, first.text
        before = await snapshot(agent)
        again = await http.put("/v1/kernels/k1", json=body(posix("a")))
        assert again.status_code == 200 and again.json() == first.json()
        assert await snapshot(agent) == before  # no second reference, no second view
        other = await http.put("/v1/kernels/k1", json=body(posix("a"), posix("b")))
        assert other.status_code == 409
        assert other.json()["error"]["code"] == "kernel-conflict"
        assert await snapshot(agent) == before


def _bad_requests(agent: AgentHarness) -> list[tuple[str, str, object, int, str]]:
    """(name, kernel id, body, status, code) of requests that must be refused."""
    agent.vfolder("vol1", "vf-ok")
    agent.vfolder("vol2", "vf-ok")
    outside = agent.root / "outside"
    outside.mkdir()
    (outside / "secret").write_text("not for kernels")
    os.symlink(outside, agent.sources["vol2"] / "escape")
    os.symlink("vf-ok", agent.sources["vol2"] / "inner-link")  # inside, but still a symlink
    (agent.sources["vol2"] / "vf-ok" / "file").write_text("x")
    ok = posix("ok", path="vf-ok")
    return [
        ("unknown volume", "k2", body(posix("x", volume="nope")), 400, "unknown-volume"),
        ("dotdot path", "k2", body(posix("x", path="../outside")), 400, "invalid-request"),
        ("absolute path", "k2", body(posix("x", path="/etc")), 400, "invalid-request"),
        ("symlink out of the volume", "k2",
         body(ok, posix("x", volume="vol2", path="escape")), 400, "path-outside-volume"),
        ("symlink below a component", "k2",
         body(ok, posix("x", volume="vol2", path="escape/secret")), 400,
         "path-outside-volume"),
        ("symlink inside the volume", "k2",
         body(ok, posix("x", volume="vol2", path="inner-link")), 400, "path-outside-volume"),
        ("another vfolder's ledger", "k2",
         body(ok, posix("x", volume="vol2", path="vf-ok/.azfs-meta")), 400,
         "path-outside-volume"),
        ("missing vfolder dir", "k2", body(ok, posix("x", volume="vol2", path="absent")),
         404, "vfolder-not-found"),
        ("a file, not a dir", "k2", body(ok, posix("x", volume="vol2", path="vf-ok/file")),
         404, "vfolder-not-found"),
        ("alias with slash", "k2", body(posix("a/b", path="vf-ok")), 400, "invalid-request"),
        ("alias dotdot", "k2", body(posix("..", path="vf-ok")), 400, "invalid-request"),
        ("duplicate alias", "k2", body(ok, dict(ok)), 400, "invalid-request"),
        ("overlapping targets", "k2", body(ok, posix("y", path="vf-ok", target="ok/sub")),
         400, "invalid-request"),
        ("target hides the home", "k2", body(posix("y", path="vf-ok", target="/home")),
         400, "invalid-request"),
        ("target is the home", "k2", body(posix("y", path="vf-ok", target="/home/work")),
         400, "invalid-request"),
        ("blob rw", "k2", body({"alias": "ds", "kind": "blob", "mode": "rw",
                                "dataset": {"url": "http://127.0.0.1:1/acct/c", "sas": "sv=1"}}),
         400, "invalid-request"),
        ("unknown field", "k2", body(dict(ok, extra=1)), 400, "invalid-request"),
        ("negative quota", "k2", body(dict(ok, quota_bytes=-1)), 400, "invalid-request"),
        ("bad kernel id", "bad$id", body(ok), 400, "invalid-kernel-id"),
        ("long kernel id", "k" * 129, body(ok), 400, "invalid-kernel-id"),
        ("slash in kernel id", "a%2Fb", body(ok), 404, "not-found"),
        ("bad kernel id start", "-k", body(ok), 400, "invalid-kernel-id"),
        ("not json", "k2", "{not json", 400, "invalid-request"),
        ("not an object", "k2", [1, 2], 400, "invalid-request"),
        ("oversize body", "k2", body(dict(ok, vfolder_id="x" * (2 * 1024 * 1024))), 413,
         "body-too-large"),
    ]


async def test_bad_requests_change_nothing(agent: AgentHarness) -> None:
    agent.vfolder("vol1", "vf-base")
    cases = _bad_requests(agent)
    async with agent.client() as http:
        r = await http.put("/v1/kernels/k1", json=body(posix("base", path="vf-base")))
        assert r.status_code == 200, r.text
        before = await snapshot(agent)
        for name, kernel_id, payload, status, code in cases:
            content = payload if isinstance(payload, str) else json.dumps(payload)
            r = await http.put(f"/v1/kernels/{kernel_id}", content=content,
                               headers={"content-type": "application/json"})
            assert r.status_code == status, (name, r.text)
            error = r.json()["error"]
            assert error["code"] == code, (name, error)
            assert error["message"], name
            assert "Traceback" not in r.text
            assert await snapshot(agent) == before, name
        # a streamed (chunked) oversize body is refused too
        async def chunks():
            for _ in range(40):
                yield b" " * 65536
        r = await http.put("/v1/kernels/k2", content=chunks(),
                           headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body-too-large"
        assert await snapshot(agent) == before
        assert not (agent.mountpoint / "kernels" / "k2").exists()


async def test_failed_dataset_rolls_back_attached_views(agent: AgentHarness,
                                                        azurite) -> None:
    """A dataset the agent cannot open (forged SAS) fails the whole export after the
    posix view was attached and its volume mounted: both are undone."""
    azurite.upload("dsc", {"a.txt": b"A"})
    agent.vfolder("vol2", "vf-ok")
    before = await snapshot(agent)
    forged = azurite.container_sas("dsc").replace("sig=", "sig=AAAA")
    async with agent.client() as http:
        r = await http.put("/v1/kernels/k9", json=body(
            posix("ok", volume="vol2", path="vf-ok"),
            {"alias": "ds", "kind": "blob", "mode": "ro",
             "dataset": {"url": azurite.container_url("dsc"), "sas": forged}}))
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"] == "dataset-unavailable"
        assert "sig=AAAA" not in r.text
    assert await snapshot(agent) == before
    assert "vol2" not in agent.volume_mounts()


async def test_blob_dataset_export(agent: AgentHarness, azurite) -> None:
    # the cache is the fusehost's: a new cache config applies to a new fusehost
    agent.stop()
    agent.kill_fusehost()
    agent.write_config(cache={"dir": str(agent.root / "cache"), "size": "64M"})
    agent.start()
    azurite.upload("dsx", {"train/a.bin": b"a" * 1000, "readme": b"hello"})
    sas = azurite.container_sas("dsx")
    async with agent.client() as http:
        r = await http.put("/v1/kernels/kb", json=body(
            {"alias": "ds", "kind": "blob", "mode": "ro", "vfolder_id": "dataset-x",
             "dataset": {"url": azurite.container_url("dsx"), "sas": sas}}))
        assert r.status_code == 200, r.text
        assert sas not in r.text
        root = agent.fuse_path("kb", "ds")
        assert sorted(os.listdir(root)) == ["readme", "train"]
        assert (root / "train" / "a.bin").read_bytes() == b"a" * 1000
        with pytest.raises(OSError) as info:
            (root / "new").write_text("x")
        assert info.value.errno == errno.EROFS
        listed = await http.get("/v1/kernels")
        assert sas not in listed.text and "sig=" not in listed.text
        metrics = (await http.get("/metrics")).text
        assert 'azfs_vfolder_read_bytes_total{vfolder="dataset-x"} 1000.0' in metrics
        assert "azfs_blob_cache_misses_total" in metrics
        assert "azfs_blob_cache_hits_total" in metrics
        assert (await http.delete("/v1/kernels/kb")).status_code == 204
    assert not (agent.mountpoint / "kernels" / "kb").exists()
    journal = (agent.state_dir / "journal.json")
    assert stat.S_IMODE(journal.stat().st_mode) == 0o600


async def test_blob_dataset_with_a_sas_url(agent: AgentHarness, azurite) -> None:
    """The agent fetches the dataset's SAS from ``sas_url`` (as the manager serves it)."""
    import http.server
    import threading

    azurite.upload("dsu", {"f.txt": b"via sas_url"})
    sas = azurite.container_sas("dsu")
    fetched: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            fetched.append(self.path)
            payload = json.dumps({"sas": sas}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        sas_url = f"http://127.0.0.1:{server.server_port}/sas/dsu"
        async with agent.client() as http:
            r = await http.put("/v1/kernels/ku", json=body(
                {"alias": "ds", "kind": "blob", "mode": "ro",
                 "dataset": {"url": azurite.container_url("dsu"), "sas_url": sas_url}}))
            assert r.status_code == 200, r.text
            assert (agent.fuse_path("ku", "ds") / "f.txt").read_bytes() == b"via sas_url"
            assert fetched == ["/sas/dsu"]
            assert (await http.delete("/v1/kernels/ku")).status_code == 204
    finally:
        server.shutdown()
        server.server_close()


async def test_ro_view_is_erofs_while_rw_view_writes(agent: AgentHarness) -> None:
    vf = agent.vfolder("vol1", "vf-shared")
    async with agent.client() as http:
        r1 = await http.put("/v1/kernels/k1", json=body(posix("data", path="vf-shared")))
        r2 = await http.put("/v1/kernels/k2",
                            json=body(posix("data", path="vf-shared", mode="ro")))
        assert r1.status_code == 200 and r2.status_code == 200, (r1.text, r2.text)
        # the kernel's bind of a read-only view is itself read-only
        home2 = agent.state_dir / "homes" / "k2"
        assert "ro" in next(e for e in mounts_under(home2)
                            if e.mount_point == str(home2 / "data")).mount_options.split(",")
        rw, ro = agent.fuse_path("k1", "data"), home2 / "data"
        (rw / "x").write_text("from kernel 1")
        assert (ro / "x").read_text() == "from kernel 1"
        for attempt in (lambda: (ro / "y").write_text("no"),
                        lambda: open(ro / "x", "a").close(),
                        lambda: os.unlink(ro / "x"),
                        lambda: os.mkdir(ro / "d")):
            with pytest.raises(OSError) as info:
                attempt()
            assert info.value.errno == errno.EROFS
        assert sorted(p.name for p in vf.iterdir() if not p.name.startswith(".")) == ["x"]
        vols = {v["name"]: v for v in (await http.get("/v1/volumes")).json()["volumes"]}
        assert vols["vol1"]["refcount"] == 2


async def test_volume_stays_mounted_while_another_kernel_uses_it(agent: AgentHarness) -> None:
    agent.vfolder("vol1", "vf-a")
    agent.vfolder("vol1", "vf-b")
    agent.vfolder("vol2", "vf-c")
    async with agent.client() as http:
        assert (await http.put("/v1/kernels/k1", json=body(
            posix("a"), posix("c", volume="vol2")))).status_code == 200
        assert (await http.put("/v1/kernels/k2", json=body(posix("b")))).status_code == 200
        assert agent.volume_mounts() == ["datasets", "vol1", "vol2"]
        (agent.fuse_path("k2", "b") / "f").write_text("kernel 2")

        assert (await http.delete("/v1/kernels/k1")).status_code == 204
        assert agent.volume_mounts() == ["datasets", "vol1"]
        assert (agent.fuse_path("k2", "b") / "f").read_text() == "kernel 2"
        vols = {v["name"]: v for v in (await http.get("/v1/volumes")).json()["volumes"]}
        assert vols["vol1"]["refcount"] == 1

        assert (await http.delete("/v1/kernels/k2")).status_code == 204
        assert agent.volume_mounts() == ["datasets"]
        assert not (agent.mountpoint / "kernels").exists()


async def test_health_metrics_openapi_and_socket_mode(agent: AgentHarness) -> None:
    assert stat.S_IMODE(agent.socket.stat().st_mode) == 0o660
    agent.vfolder("vol1", "vf-m")
    async with agent.client() as http:
        health = await http.get("/v1/health")
        assert health.status_code == 200
        assert health.json()["status"] == "ok"
        assert health.json()["fuse"]["state"] == "healthy"
        api = (await http.get("/openapi.json")).json()
        assert {"/v1/kernels/{kernel_id}", "/v1/kernels", "/v1/volumes",
                "/v1/health"} <= set(api["paths"])
        assert (await http.put("/v1/kernels/km", json=body(
            posix("m", path="vf-m", vfolder_id="vf-metrics")))).status_code == 200
        (agent.fuse_path("km", "m") / "f").write_bytes(b"z" * 4096)
        assert (agent.fuse_path("km", "m") / "f").read_bytes() == b"z" * 4096
        metrics = (await http.get("/metrics")).text
        assert 'azfs_vfolder_written_bytes_total{vfolder="vf-metrics"} 4096.0' in metrics
        assert 'azfs_fuse_op_duration_seconds_count{op="write"}' in metrics
        assert 'azfs_agent_volume_refcount{volume="vol1"} 1.0' in metrics
        assert 'azfs_vfolder_usage_bytes{vfolder="vf-metrics"} 4096.0' in metrics
        assert "azfs_fusehost_up 1.0" in metrics
        missing = await http.get("/v1/nothing")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not-found"


async def test_operator_cli(agent: AgentHarness) -> None:
    agent.vfolder("vol1", "vf-cli")
    async with agent.client() as http:
        assert (await http.put("/v1/kernels/kc", json=body(
            posix("cli", path="vf-cli", mode="ro")))).status_code == 200

    def azfs(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "azfs.cli.main", "agent", "--socket",
                               str(agent.socket), *args], capture_output=True, text=True,
                              cwd=REPO, timeout=60)

    status = azfs("status")
    assert status.returncode == 0, status.stderr
    assert "test-node" in status.stdout and "healthy" in status.stdout
    kernels = azfs("kernels")
    assert kernels.returncode == 0 and "kc  cli:ro" in kernels.stdout
    volumes = azfs("volumes")
    assert volumes.returncode == 0
    assert any(line.split() == ["vol1", "bind", "requested", "yes", "1"]
               for line in volumes.stdout.splitlines())
    as_json = json.loads(azfs("--json", "volumes").stdout)
    assert {v["name"] for v in as_json["volumes"]} == {"vol1", "vol2", "datasets"}
    bad = azfs("unexport", "bad$id")
    assert bad.returncode == 1 and "kernel id" in bad.stderr
    done = azfs("unexport", "kc")
    assert done.returncode == 0, done.stderr
    assert "no kernels" in azfs("kernels").stdout
    assert agent.volume_mounts() == ["datasets"]
    gone = subprocess.run([sys.executable, "-m", "azfs.cli.main", "agent", "--socket",
                           str(agent.root / "nope.sock"), "status"], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert gone.returncode == 1 and "no agent socket" in gone.stderr
    assert "Traceback" not in gone.stderr


async def test_tcp_listener_requires_the_bearer_token(tmp_path: Path) -> None:
    import httpx

    from tests.support.services import free_port

    secret = tmp_path / "agent.secret"
    secret.write_text("s3cret-token-for-the-manager\n")
    secret.chmod(0o600)
    port = free_port()
    harness = AgentHarness(tmp_path)
    harness.write_config(manager={"listen": f"127.0.0.1:{port}", "secret_file": str(secret)})
    try:
        harness.start()
        harness.vfolder("vol1", "vf-t")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            r = await http.put("/v1/kernels/kt", json=body(posix("t", path="vf-t")))
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            r = await http.get("/v1/kernels", headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401
            auth = {"Authorization": "Bearer s3cret-token-for-the-manager"}
            r = await http.put("/v1/kernels/kt", json=body(posix("t", path="vf-t")),
                               headers=auth)
            assert r.status_code == 200, r.text
            assert (await http.delete("/v1/kernels/kt", headers=auth)).status_code == 204
        assert "s3cret" not in harness.log.read_text()
    finally:
        harness.cleanup()


async def test_quota_of_the_export_is_enforced(agent: AgentHarness) -> None:
    agent.vfolder("vol1", "vf-q")
    async with agent.client() as http:
        r = await http.put("/v1/kernels/kq", json=body(
            posix("q", path="vf-q", quota_bytes=64 * 1024, quota_files=3)))
        assert r.status_code == 200, r.text
    root = agent.fuse_path("kq", "q")
    (root / "small").write_bytes(b"s" * 1000)
    with pytest.raises(OSError) as info:
        with open(root / "big", "wb") as f:
            f.write(b"b" * (128 * 1024))
    assert info.value.errno == errno.EDQUOT
    # the refused write wrote nothing, but "big" was created: 2 of 3 files are used
    assert (root / "big").stat().st_size == 0
    (root / "f2").write_bytes(b"")  # the third file fits
    for name in ("f3", "f4"):  # a fourth never does
        with pytest.raises(OSError) as info:
            (root / name).write_bytes(b"")
        assert info.value.errno == errno.EDQUOT
        assert not (root / name).exists()
    assert sorted(os.listdir(root)) == ["big", "f2", "small"]


async def _getxattr_requests(agent: AgentHarness) -> int:
    stats = await FuseHostClient(agent.state_dir / "run" / "fusehost.sock").stats()
    return stats["fs"]["ops"].get("getxattr", {}).get("count", 0)


@pytest.mark.parametrize("xattrs", [False, True])
async def test_xattrs_switch_what_each_write_and_ls_costs(agent: AgentHarness,
                                                          xattrs: bool) -> None:
    """Off (the default), the kernel stops asking after one ENOSYS; on, user.* works."""
    if xattrs:
        agent.stop()
        agent.kill_fusehost()
        agent.write_config(xattrs=True)
        agent.start()
    agent.vfolder("vol1", "vf-x")
    async with agent.client() as http:
        r = await http.put("/v1/kernels/kx", json=body(posix("data", path="vf-x")))
        assert r.status_code == 200, r.text
    root = agent.fuse_path("kx", "data")
    before = await _getxattr_requests(agent)
    with open(root / "big", "wb") as f:
        for _ in range(40):
            f.write(b"x" * 65536)
    for i in range(30):
        (root / f"f{i}").write_bytes(b"y")
    listing = subprocess.run(["ls", "-l", str(root)], capture_output=True, text=True)
    assert listing.returncode == 0 and listing.stdout.count("\n") == 32
    asked = await _getxattr_requests(agent) - before
    if xattrs:
        # one security.capability check per write(), the ls -l probes per file
        assert asked >= 40 + 30
        os.setxattr(root / "big", "user.k", b"v")
        assert os.getxattr(root / "big", "user.k") == b"v"
    else:
        assert asked <= 1  # the one that answered ENOSYS
        assert (root / "big").stat().st_size == 40 * 65536
        with pytest.raises(OSError) as exc:
            os.setxattr(root / "big", "user.k", b"v")
        assert exc.value.errno == errno.EOPNOTSUPP
