"""A cluster on one machine: three agents, two managers, one PostgreSQL, one etcd.

All processes are real (``azfs-managerd``, ``azfs-agentd`` and its fusehost
with a real FUSE mount per node); the three nodes mount one ``bind`` volume
that stands in for an Azure Files share.  The scenarios:

* a vfolder used by kernels on two nodes at once: a write on one is seen on
  the other within the FUSE cache timeout; usage is exact once both are
  done; delete and purge are refused while any node's kernel uses it;
* one agent killed (-9) and brought back: it is shown down meanwhile,
  creates on it fail at once with ``agent-down``, and on its return its
  kernels are reconciled with its journal;
* one manager killed (-9) under a steady stream of API calls from several
  clients that fail over to the other manager: no call is lost without an
  error, no vfolder is created twice, and the leader work moves over.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from azfs.volumes.mountinfo import mounts_under
from tests.support.cluster import REGISTRATION_TTL, Cluster
from tests.support.etcd import EtcdServer
from tests.support.postgres import postgres  # noqa: F401

#: how long a change made on one node may take to show on another (SEMANTICS: the
#: cache timeout, 1 s), with room for a loaded test machine
VISIBLE_WITHIN = 10.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, postgres, etcd_server) -> Iterator[Cluster]:  # noqa: F811
    root = tmp_path_factory.mktemp("cluster")
    with Cluster(root, postgres.new_database(), etcd_server.endpoint, agents=3,
                 managers=2) as c:
        yield c
    assert mounts_under(root) == [], "mounts left behind after teardown"


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory) -> Iterator[EtcdServer]:
    """One etcd for the module (the cluster fixture lives that long)."""
    server = EtcdServer(tmp_path_factory.mktemp("etcd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def poll(predicate, timeout: float, what: str):
    """Polls until ``predicate()`` returns something truthy; returns it."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


def kernel(c: httpx.Client, kernel_id: str, agent: str, *vfolders: str) -> dict:
    r = c.post("/v1/kernels", json={"kernel_id": kernel_id, "agent": agent, "dotfolders": False,
                                     "vfolders": [{"vfolder": v} for v in vfolders]})
    assert r.status_code == 201, r.text
    return r.json()


def test_one_vfolder_on_two_nodes(cluster: Cluster) -> None:
    a, b = cluster.managers
    node1, node2 = cluster.agents[0], cluster.agents[1]
    token = cluster.user("olive")
    with a.client(token) as ca, b.client(token) as cb:
        r = ca.post("/v1/vfolders", json={"alias": "shared-data"})
        assert r.status_code == 201, r.text
        vfid = r.json()["id"]
        kernel(ca, "k-n1", "node-1", "shared-data")
        kernel(cb, "k-n2", "node-2", "shared-data")  # the other manager, the other node
        assert cb.get(f"/v1/vfolders/{vfid}").json()["status"] == "mounted"
        view1, view2 = node1.fuse_path("k-n1", "shared-data"), node2.fuse_path("k-n2",
                                                                              "shared-data")
        (view1 / "from-1.bin").write_bytes(b"1" * 10_000)
        poll(lambda: (view2 / "from-1.bin").exists()
             and (view2 / "from-1.bin").read_bytes() == b"1" * 10_000,
             VISIBLE_WITHIN, "node 1's write seen on node 2")
        (view2 / "sub").mkdir()
        (view2 / "sub" / "from-2.bin").write_bytes(b"2" * 5_000)
        poll(lambda: (view1 / "sub" / "from-2.bin").exists()
             and (view1 / "sub" / "from-2.bin").stat().st_size == 5_000,
             VISIBLE_WITHIN, "node 2's write seen on node 1")

        # in use on any node: neither delete nor purge
        r = ca.delete("/v1/vfolders/shared-data")
        assert r.status_code == 409 and r.json()["error"]["code"] == "vfolder-in-use", r.text
        r = cb.post("/v1/vfolders/shared-data/purge")
        assert r.status_code == 409, r.text
        assert cb.delete("/v1/kernels/k-n1").status_code == 204
        r = cb.delete("/v1/vfolders/shared-data")  # node 2's kernel still uses it
        assert r.status_code == 409 and r.json()["error"]["code"] == "vfolder-in-use", r.text
        assert ca.delete("/v1/kernels/k-n2").status_code == 204

        # usage: exact once both nodes are done (3 objects: two files and a directory)
        poll(lambda: ca.get(f"/v1/vfolders/{vfid}/usage").json()
             == {"id": vfid, "bytes": 15_000, "files": 3},
             VISIBLE_WITHIN, "exact usage through manager A")
        assert cb.get(f"/v1/vfolders/{vfid}/usage").json() == {
            "id": vfid, "bytes": 15_000, "files": 3}
        assert ca.delete("/v1/vfolders/shared-data").status_code == 204
        assert cb.post(f"/v1/vfolders/{vfid}/purge").status_code == 204
        assert not (cluster.shared / uuid.UUID(vfid).hex).exists()


def _heartbeat(ledger: Path, pid: int) -> float:
    """When the daemon of ``pid`` last merged into the shared ledger (0: never)."""
    try:
        holders = json.loads(ledger.read_text()).get("holders", {})
    except (OSError, ValueError):
        return 0.0
    return max((t for h, t in holders.items() if f":{pid}:" in h), default=0.0)


def test_quota_holds_across_nodes(cluster: Cluster) -> None:
    """One node's writes count against the other's once both have merged the ledger."""
    a, b = cluster.managers
    token = cluster.user("quinn")
    with a.client(token) as ca, b.client(cluster.admin_token) as cb_admin:
        vfid = ca.post("/v1/vfolders", json={"alias": "capped"}).json()["id"]
        assert cb_admin.put(f"/v1/vfolders/{vfid}/quota",
                            json={"quota_bytes": 100_000}).status_code == 200
        kernel(ca, "k-q1", "node-1", "capped")
        kernel(ca, "k-q2", "node-2", "capped")
        (cluster.agents[0].fuse_path("k-q1", "capped") / "one").write_bytes(b"x" * 60_000)
        poll(lambda: ca.get(f"/v1/vfolders/{vfid}/usage").json()["bytes"] == 60_000,
             VISIBLE_WITHIN, "node 1's write merged into the shared ledger")
        # node 2 sees the shared total at its next merge (its heartbeat while idle)
        merged, pid = time.time(), cluster.agents[1].fusehost_pid()
        assert pid is not None
        ledger = cluster.shared / uuid.UUID(vfid).hex / ".azfs-meta" / "usage.json"
        poll(lambda: _heartbeat(ledger, pid) > merged, VISIBLE_WITHIN,
             "node 2 merged the shared ledger")
        with pytest.raises(OSError) as refused:
            (cluster.agents[1].fuse_path("k-q2", "capped") / "two").write_bytes(
                b"y" * 60_000)
        assert refused.value.errno == errno.EDQUOT
        assert cb_admin.delete("/v1/kernels/k-q1").status_code == 204
        assert cb_admin.delete("/v1/kernels/k-q2").status_code == 204
        used = poll(lambda: ca.get(f"/v1/vfolders/{vfid}/usage").json(), VISIBLE_WITHIN,
                    "usage")
        assert 60_000 <= used["bytes"] <= 100_000


def _journal_without(path: Path, kernel_id: str) -> None:
    data = json.loads(path.read_text())
    del data["kernels"][kernel_id]
    path.write_text(json.dumps(data))


def _agents(manager, token: str) -> dict[str, dict]:
    with manager.client(token) as c:
        r = c.get("/v1/agents")
        assert r.status_code == 200, r.text
        return {a["name"]: a for a in r.json()}


def test_agent_lost_and_back_is_reconciled(cluster: Cluster) -> None:
    a, b = cluster.managers
    node3 = cluster.agents[2]
    admin, token = cluster.admin_token, cluster.user("rhea")
    assert _agents(a, admin)["node-3"]["state"] == "up"
    with a.client(token) as ca, b.client(admin) as cb_admin:
        ids = {}
        for alias in ("lost", "forced", "kept"):
            ids[alias] = ca.post("/v1/vfolders", json={"alias": alias}).json()["id"]
            kernel(ca, f"k-{alias}", "node-3", alias)

        # the node dies: agent and fusehost killed; its registration lapses
        node3.kill()
        node3.kill_fusehost()
        poll(lambda: _agents(b, admin)["node-3"]["state"] == "down",
             REGISTRATION_TTL * 4, "node-3 shown down")
        assert _agents(a, admin)["node-3"]["state"] == "down"  # whichever manager answers
        assert _agents(a, admin)["node-1"]["state"] == "up"
        r = ca.post("/v1/kernels", json={"kernel_id": "k-new", "agent": "node-3"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "agent-down", r.text
        assert ca.get("/v1/kernels/k-new").status_code == 404  # nothing recorded
        r = ca.delete("/v1/kernels/k-kept")
        assert r.status_code == 503 and r.json()["error"]["code"] == "agent-down", r.text
        # an admin gives up on one kernel while the node is away
        assert cb_admin.delete("/v1/kernels/k-forced", params={"force": True}).status_code \
            == 204
        # the node lost one kernel for good (its record is gone from the node's journal,
        # as when a node comes back with a replaced disk)
        _journal_without(node3.state_dir / "journal.json", "k-lost")

        node3.start()
        poll(lambda: ca.get("/v1/kernels/k-lost").json()["status"] == "gone",
             REGISTRATION_TTL * 4, "k-lost marked gone")
        assert ca.get(f"/v1/vfolders/{ids['lost']}").json()["status"] == "ready"
        assert ca.get("/v1/kernels/k-kept").json()["status"] == "running"
        assert ca.get(f"/v1/vfolders/{ids['kept']}").json()["status"] == "mounted"

        def agent_kernels() -> set[str]:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(node3.socket)),
                              base_url="http://agent", timeout=10) as http:
                return {k["kernel_id"] for k in http.get("/v1/kernels").json()["kernels"]}

        # force-destroyed while away: unexported once the node is back
        poll(lambda: agent_kernels() == {"k-kept"}, REGISTRATION_TTL * 4,
             "k-forced unexported on node-3")
        assert (node3.fuse_path("k-kept", "kept")).is_dir()
        assert _agents(b, admin)["node-3"]["state"] == "up"

        # the vfolders of the lost kernel are free: delete works; a gone kernel's id is free
        assert ca.delete("/v1/vfolders/lost").status_code == 204
        assert ca.delete("/v1/kernels/k-lost").status_code == 204
        assert ca.get("/v1/kernels/k-lost").status_code == 404
        assert ca.delete("/v1/kernels/k-kept").status_code == 204
        assert agent_kernels() == set()


class Caller:
    """A client that creates vfolders in a loop, failing over between managers.

    Each call is retried on the other manager after a transport error until it
    gets an answer; a 409 ``vfolder-exists`` after such a retry means the first
    attempt was committed.  Every outcome is kept for the checks.
    """

    def __init__(self, cluster: Cluster, token: str, prefix: str) -> None:
        self.urls = [m.url for m in cluster.managers]
        self.token = token
        self.prefix = prefix
        self.attempted: list[str] = []
        self.created: list[str] = []
        self.errors: list[str] = []
        self.failovers = 0
        self.stop = threading.Event()

    def _call(self, method: str, path: str, start: int, **kwargs) -> httpx.Response:
        for attempt in range(40):
            url = self.urls[(start + attempt) % len(self.urls)]
            try:
                return httpx.request(method, url + path, timeout=20,
                                     headers={"Authorization": f"Bearer {self.token}"},
                                     **kwargs)
            except httpx.TransportError:
                self.failovers += 1
                time.sleep(0.05)
        raise AssertionError(f"no manager answered {method} {path}")

    def run(self) -> None:
        n = 0
        try:
            while not self.stop.is_set():
                alias = f"{self.prefix}-{n}"
                self.attempted.append(alias)
                before = self.failovers
                r = self._call("POST", "/v1/vfolders", n, json={"alias": alias})
                if r.status_code == 201:
                    self.created.append(alias)
                    # read it back through the other manager
                    got = self._call("GET", f"/v1/vfolders/{r.json()['id']}", n + 1)
                    if got.status_code != 200 or got.json()["alias"] != alias:
                        self.errors.append(f"read back {alias}: {got.status_code}")
                elif r.status_code == 409 and self.failovers > before \
                        and r.json()["error"]["code"] == "vfolder-exists":
                    self.created.append(alias)  # the attempt that broke off was committed
                else:
                    self.errors.append(f"create {alias}: {r.status_code} {r.text[:200]}")
                n += 1
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(f"{type(exc).__name__}: {exc}")


def _orphan(cluster: Cluster) -> Path:
    """A vfolder-like directory no row knows of, old enough for the sweeper."""
    path = cluster.shared / uuid.uuid4().hex
    path.mkdir()
    old = time.time() - 7200
    os.utime(path, (old, old))
    return path


def test_manager_killed_under_load(cluster: Cluster) -> None:
    leader = poll(cluster.leader, 20, "a leader")
    survivor = next(m for m in cluster.managers if m is not leader)
    assert not survivor.is_leader()
    assert "azfs_manager_leader 1.0" in httpx.get(f"{leader.url}/metrics").text
    assert "azfs_manager_leader 0.0" in httpx.get(f"{survivor.url}/metrics").text

    # the singleton work runs once: only the leader sweeps
    orphan = _orphan(cluster)
    poll(lambda: not orphan.exists() and orphan.name in leader.log_text(), 20,
         "the leader sweeps an orphan (and logs it)")
    assert orphan.name not in survivor.log_text()

    # the same alias from two managers at once: one vfolder and one clear conflict
    token = cluster.user("walt")
    barrier, answers = threading.Barrier(2), []

    def create(manager) -> None:
        with manager.client(token) as c:
            barrier.wait()
            answers.append(c.post("/v1/vfolders", json={"alias": "twice"}))

    threads = [threading.Thread(target=create, args=(m,)) for m in cluster.managers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(r.status_code for r in answers) == [201, 409], [r.text for r in answers]
    assert next(r for r in answers if r.status_code == 409).json()["error"]["code"] \
        == "vfolder-exists"

    callers = [Caller(cluster, cluster.user(f"load{i}"), f"c{i}") for i in range(4)]
    workers = [threading.Thread(target=c.run) for c in callers]
    try:
        for w in workers:
            w.start()
        poll(lambda: all(len(c.created) >= 3 for c in callers), 60, "calls before the kill")
        leader.kill()
        marks = [len(c.attempted) for c in callers]
        poll(survivor.is_leader, 30, "the survivor takes the leader lease")
        poll(lambda: all(len(c.created) >= m + 5 for c, m in zip(callers, marks, strict=True)),
             60, "calls after the kill")
    finally:
        for c in callers:
            c.stop.set()
        for w in workers:
            w.join(60)
    for c in callers:
        assert c.errors == [], c.errors
        assert c.failovers > 0  # half its calls after the kill went to the dead manager first
        with survivor.client(c.token) as http:
            listed = [v["alias"] for v in http.get("/v1/vfolders").json()]
        # every call answered; each alias exists exactly once
        assert sorted(listed) == sorted(c.attempted) == sorted(c.created)

    # the singleton work moved over: the survivor now sweeps
    orphan = _orphan(cluster)
    poll(lambda: not orphan.exists() and orphan.name in survivor.log_text(), 20,
         "the survivor sweeps an orphan (and logs it)")

    # the killed manager comes back as a standby
    leader.start()
    assert not leader.is_leader() and survivor.is_leader()
    with leader.client(token) as c:
        assert [v["alias"] for v in c.get("/v1/vfolders").json()] == ["twice"]


def test_etcd_down_is_not_agent_down(cluster: Cluster, etcd_server: EtcdServer) -> None:
    """Without etcd the managers cannot judge its agents: unknown, and a 502 on calls."""
    manager = next(m for m in cluster.managers if m.running)
    token = cluster.user("ezra")
    etcd_server.stop()
    try:
        states = _agents(manager, cluster.admin_token)
        assert {states[f"node-{i}"]["state"] for i in (1, 2, 3)} == {"unknown"}
        with manager.client(token) as c:
            r = c.post("/v1/kernels", json={"kernel_id": "k-e", "agent": "node-1"})
            assert r.status_code == 502, r.text
            assert r.json()["error"]["code"] == "agent-unreachable"
            assert c.get("/v1/kernels/k-e").status_code == 404
    finally:
        etcd_server.start()
    poll(lambda: {a["state"] for n, a in _agents(manager, cluster.admin_token).items()
                  if n.startswith("node-")} == {"up"}, REGISTRATION_TTL * 4,
         "agents up again with etcd back")
