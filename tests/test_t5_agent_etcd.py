"""Whole-program test of an agent whose volume config lives in a real etcd.

The agent registers itself under ``/azfs/agents/<id>`` with a lease, finds
volumes added to etcd after it started, and withdraws its registration on
SIGTERM.  When etcd is down at start, the agent uses the last good config it
kept and still restores its exports.
"""

from __future__ import annotations

import json
from pathlib import Path

import etcd3

from azfs.volumes.etcd_store import EtcdVolumeStore
from azfs.volumes.model import load_yaml_file
from tests.support.agent import AgentHarness
from tests.support.etcd import etcd_server  # noqa: F401
from tests.support.services import wait_until
from tests.test_t5_agent_exports import body, posix


async def test_agent_with_etcd_store_registers_and_exports(tmp_path: Path,
                                                           etcd_server) -> None:  # noqa: F811
    harness = AgentHarness(tmp_path, volumes={"vol1": "requested", "datasets": "startup"})
    store = EtcdVolumeStore(etcd_server.endpoint)
    client = etcd3.client(host="127.0.0.1", port=etcd_server.client_port)
    try:
        store.import_volumes(load_yaml_file(harness.volumes_file))
        harness.volumes_file.unlink()  # etcd is the only source
        harness.write_config(etcd=etcd_server.endpoint, registration_ttl=10)
        harness.start()

        # registration runs next to the API: it may land a moment after the socket answers
        wait_until(lambda: client.get("/azfs/agents/test-node")[0] is not None, 15,
                   "the agent's etcd registration", harness.proc, harness.log)
        value, meta = client.get("/azfs/agents/test-node")
        assert value is not None and meta.lease_id
        registered = json.loads(value)
        assert registered["socket"] == str(harness.socket)
        assert registered["url"] is None  # no TCP listener: managers use the socket

        harness.vfolder("vol1", "vf-1")
        late = harness.root / "src-late"
        (late / "vf-2").mkdir(parents=True)
        store.import_volumes([v for v in load_yaml_file(_yaml(harness.root, late))])
        async with harness.client() as http:
            r = await http.put("/v1/kernels/k1", json=body(
                posix("one", path="vf-1"), posix("two", volume="late", path="vf-2")))
            assert r.status_code == 200, r.text
            assert [m["destination"] for m in r.json()["mounts"]] == ["/home/work"]
            home = harness.state_dir / "homes" / "k1"
            assert {m for m in harness.mounts() if m.startswith(f"{home}/")} == {
                f"{home}/one", f"{home}/two", f"{home}/datasets"}
            assert (await http.delete("/v1/kernels/k1")).status_code == 204
        assert harness.volume_mounts() == ["datasets"]

        async with harness.client() as http:
            assert (await http.put("/v1/kernels/k2", json=body(
                posix("one", path="vf-1")))).status_code == 200
        assert harness.stop() == 0
        assert client.get("/azfs/agents/test-node")[0] is None

        # etcd is down: the agent starts from its cached config and restores k2
        etcd_server.stop()
        harness.start()
        async with harness.client() as http:
            kernels = (await http.get("/v1/kernels")).json()["kernels"]
            assert [k["kernel_id"] for k in kernels] == ["k2"]
            assert (harness.fuse_path("k2", "one")).is_dir()
            assert (await http.delete("/v1/kernels/k2")).status_code == 204
        assert harness.volume_mounts() == ["datasets"]
        cache = harness.state_dir / "volumes-cache.yaml"
        assert cache.stat().st_mode & 0o077 == 0
    finally:
        client.close()
        store.close()
        harness.cleanup()


def _yaml(root: Path, source: Path) -> Path:
    path = root / "late.yaml"
    path.write_text("volumes:\n  - name: late\n    mount:\n      at: requested\n"
                    f"      fstype: bind\n      path: {source}\n")
    return path
