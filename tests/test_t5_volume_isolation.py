"""One slow or dead share never stalls another: a real agent, its FUSE process, two volumes.

Volume ``slow`` is a bind volume whose directory sits on a latency-adding
passthrough FUSE filesystem (:mod:`tests.support.slowfs`), the stand-in for an
Azure Files share; ``kill -STOP`` of that filesystem's daemon is what a hung
SMB server looks like to the kernel.  Volume ``fast`` is a local directory.
Callers are separate processes, as containers would be, each with a timeout
of its own so that a hang fails the test instead of hanging it.
"""
# ruff: noqa: F811 - pytest fixtures are imported by name and requested by name

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from agentd.fuseclient import FuseHostClient
from tests.support.agent import AgentHarness
from tests.support.fuse import azfs
from tests.support.slowfs import SlowVolume, slow_volume

METADATA_DEADLINE = 2.0
DATA_DEADLINE = 3.0
THREADS = 4
#: a bound on one call of a healthy volume while another one is frozen (a liveness
#: bound, far above any normal answer; not a speed measurement)
HEALTHY_CALL_BOUND = 1.0


class Node:
    def __init__(self, agent: AgentHarness, slow: SlowVolume) -> None:
        self.agent = agent
        self.slow = slow

    async def health(self) -> dict:
        async with self.agent.client() as http:
            return (await http.get("/v1/health")).json()

    async def export(self, kernel: str, *vfolders: dict) -> None:
        for vf in vfolders:
            self.agent.vfolder(str(vf["volume"]), str(vf["path"]))
        async with self.agent.client() as http:
            r = await http.put(f"/v1/kernels/{kernel}",
                               json={"uid": 1000, "gid": 1000, "vfolders": list(vfolders)})
            assert r.status_code == 200, r.text


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    slow = slow_volume(tmp_path / "share", latency_ms=0)
    harness = AgentHarness(tmp_path / "agent")
    try:
        harness.sources["slow"] = slow.mountpoint
        harness.write_volumes({"fast": "requested", "slow": "requested"})
        harness.write_config(volume_io={"threads": THREADS, "mode": "threads",
                                        "metadata_deadline": METADATA_DEADLINE,
                                        "data_deadline": DATA_DEADLINE})
        harness.start()
        yield Node(harness, slow)
    finally:
        slow.thaw() if slow.frozen else None
        harness.cleanup()
        slow.cleanup()


def vfolder(alias: str, volume: str, **extra: object) -> dict:
    return {"alias": alias, "volume": volume, "path": f"vf-{alias}", "mode": "rw", **extra}


def run_callers(script: str, args: list[list[str]], timeout: float) -> list[dict]:
    """Runs one Python caller process per argument list at once; their JSON answers."""
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *a],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for a in args]
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            assert p.returncode == 0, stderr
            out.append(json.loads(stdout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


HEALTHY_WORKER = """
    import json, os, sys, time
    base, rounds = sys.argv[1], int(sys.argv[2])
    os.makedirs(base, exist_ok=True)
    worst, done = {}, 0
    def timed(name, fn, *a):
        t = time.monotonic()
        r = fn(*a)
        worst[name] = max(worst.get(name, 0.0), time.monotonic() - t)
        return r
    def write(path, data):
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    def read(path):
        with open(path, "rb") as f:
            return f.read()
    for i in range(rounds):
        p = os.path.join(base, f"f{i}")
        timed("create+write+fsync", write, p, b"x" * 4096)
        timed("stat", os.stat, p)
        timed("ls", os.listdir, base)
        assert timed("read", read, p) == b"x" * 4096
        timed("rename", os.rename, p, p + ".done")
        done += 1
    print(json.dumps({"done": done, "worst": worst}))
"""

FROZEN_CALLER = """
    import errno, json, os, sys, time
    path, op = sys.argv[1], sys.argv[2]
    t = time.monotonic()
    code = 0
    try:
        if op == "stat":
            os.stat(path)
        elif op == "read":
            with open(path, "rb") as f:
                f.read()
        elif op == "ls":
            os.listdir(path)
        elif op == "create":
            open(path, "w").close()
    except OSError as exc:
        code = exc.errno
    print(json.dumps({"errno": code, "seconds": time.monotonic() - t}))
"""


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


async def test_a_frozen_volume_fails_fast_and_never_stalls_another(node: Node) -> None:
    await node.export("k1", vfolder("a", "fast"), vfolder("b", "slow"))
    a = node.agent.fuse_path("k1", "a")
    b = node.agent.fuse_path("k1", "b")
    (b / "file").write_bytes(b"kept across the freeze")
    (b / "dir").mkdir()
    fusehost = node.agent.fusehost_pid()
    assert fusehost is not None
    baseline_threads = threads_of(fusehost)

    node.slow.freeze()
    # callers of the frozen volume: a timeout, then refusals at once; never a hang
    frozen = run_callers(FROZEN_CALLER, [[str(b / "dir" / "x"), "stat"],
                                         [str(b / "file"), "read"]],
                         timeout=DATA_DEADLINE * 3 + 20)
    for answer in frozen:
        assert answer["errno"] in (errno.ETIMEDOUT, errno.EIO), answer
        assert answer["seconds"] < DATA_DEADLINE + 2, answer
    assert errno.ETIMEDOUT in {answer["errno"] for answer in frozen}
    health = await node.health()
    assert health["volume_io"]["slow"]["state"] == "degraded"
    assert health["volume_io"]["fast"]["state"] == "healthy"
    assert health["status"] == "degraded" and health["degraded_volumes"] == ["slow"]
    # the operator's views of it: metrics and the status command
    async with node.agent.client() as http:
        metrics = (await http.get("/metrics")).text
    assert 'azfs_volume_healthy{volume="slow"} 0.0' in metrics
    assert 'azfs_volume_healthy{volume="fast"} 1.0' in metrics
    assert 'azfs_volume_timeouts_total{volume="slow"}' in metrics
    status = azfs("agent", "--socket", str(node.agent.socket), "status")
    assert status.returncode == 1, status.stderr  # degraded
    assert any(line.split()[1:3] == ["slow", "degraded"] for line in status.stdout.splitlines()
               if line.startswith("io")), status.stdout

    # the healthy volume, from several callers at once, while more calls hit the frozen one
    callers = [[str(a / f"w{i}"), "30"] for i in range(4)]
    more_frozen = subprocess.Popen(
        [sys.executable, "-c", "import os, sys\nfor i in range(200):\n"
         "    try: os.stat(sys.argv[1] + '/n%d' % i)\n    except OSError: pass",
         str(b)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        results = run_callers(HEALTHY_WORKER, callers, timeout=120)
        assert more_frozen.wait(60) == 0
    finally:
        if more_frozen.poll() is None:
            more_frozen.kill()
            more_frozen.wait()
    for result in results:
        assert result["done"] == 30
        for op, seconds in result["worst"].items():
            assert seconds < HEALTHY_CALL_BOUND, (op, seconds)
    # stuck threads are counted, never multiplied: at most the frozen volume's pool
    # (plus the fast volume's, its probe and the invalidator's thread)
    assert threads_of(fusehost) <= baseline_threads + 2 * THREADS + 2
    assert (await node.health())["volume_io"]["slow"]["stuck"] <= THREADS

    node.slow.thaw()
    deadline = time.monotonic() + 30
    while (await node.health())["volume_io"]["slow"]["state"] != "healthy":
        assert time.monotonic() < deadline, "the volume never came back"
        await trio.sleep(0.1)
    # the same view works again, without a remount
    assert (b / "file").read_bytes() == b"kept across the freeze"
    (b / "after").write_text("new")
    assert sorted(os.listdir(b)) == ["after", "dir", "file"]
    assert (await node.health())["status"] == "ok"
    # each transition logged once
    log = (node.agent.state_dir / "fusehost.log").read_text()
    assert log.count("volume slow degraded") == 1 and log.count("volume slow healthy again") == 1


WRITER = """
    import errno, json, os, sys
    path, chunk = sys.argv[1], int(sys.argv[2])
    written, refused = 0, False
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        while written < 64 * chunk:
            try:
                n = os.write(fd, b"q" * chunk)
            except OSError as exc:
                assert exc.errno == errno.EDQUOT, exc
                refused = True
                break
            written += n
    finally:
        os.close(fd)
    print(json.dumps({"written": written, "refused": refused}))
"""


async def test_quota_and_usage_stay_exact_with_concurrent_writers(node: Node) -> None:
    node.slow.set_latency(1)
    quota = 3 << 20
    chunk = 64 << 10
    await node.export("k2", vfolder("q", "slow", quota_bytes=quota, quota_files=100))
    q = node.agent.fuse_path("k2", "q")
    results = run_callers(WRITER, [[str(q / f"w{i}"), str(chunk)] for i in range(8)],
                          timeout=300)
    assert any(r["refused"] for r in results), results
    source = node.slow.source / "vf-q"
    sizes = {p.name: p.stat().st_size for p in source.iterdir() if p.name != ".azfs-meta"}
    assert sizes == {f"w{i}": r["written"] for i, r in enumerate(results)}
    total = sum(sizes.values())
    assert quota - 8 * chunk < total <= quota
    stats = await FuseHostClient(node.agent.state_dir / "run" / "fusehost.sock").stats()
    usage = next(iter(stats["usage"].values()))
    assert (usage["bytes"], usage["files"]) == (total, 8)
    # the file quota holds under concurrency too: 100 files at most
    made = run_callers("""
        import json, os, sys
        made = 0
        for i in range(40):
            try:
                open(os.path.join(sys.argv[1], f"c{sys.argv[2]}-{i}"), "w").close()
                made += 1
            except OSError:
                pass
        print(json.dumps(made))
    """, [[str(q), str(i)] for i in range(8)], timeout=300)
    assert 8 + sum(made) == 100
    stats = await FuseHostClient(node.agent.state_dir / "run" / "fusehost.sock").stats()
    assert next(iter(stats["usage"].values()))["files"] == 100


async def test_bookkeeping_returns_to_baseline_after_the_kernel_forgets(node: Node) -> None:
    """readdirplus, lookups and opens through a kernel view, then drop_caches: the
    daemon's inode table and descriptors go back to what they were."""
    client = FuseHostClient(node.agent.state_dir / "run" / "fusehost.sock")
    await node.export("k3", vfolder("m", "fast"))
    view = node.agent.fuse_path("k3", "m")
    os.listdir(view)
    Path("/proc/sys/vm/drop_caches").write_text("2\n")
    baseline = (await client.stats())["table"]
    for i in range(500):
        (view / f"f{i}").write_bytes(b"x")
    (view / "sub").mkdir()
    subprocess.run(["ls", "-l", str(view)], check=True, capture_output=True)
    with open(view / "f1", "rb") as f:
        f.read()
        grown = (await client.stats())["table"]
        assert grown["inodes"] > baseline["inodes"] + 400 and grown["open_files"] == 1
    deadline = time.monotonic() + 30
    while True:
        Path("/proc/sys/vm/drop_caches").write_text("2\n")
        now = (await client.stats())["table"]
        if now == baseline:
            break
        assert time.monotonic() < deadline, (baseline, now)
        await trio.sleep(0.2)
    assert now["forget_underflows"] == 0
