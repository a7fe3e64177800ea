"""Finding agents (config, a real etcd with leases, API registrations) and reaching them.

etcd is a real server on loopback; the agent registration is written the way
agents write it (a JSON value under a lease).  The client is checked against
a missing socket and a socket nobody answers on.
"""

from __future__ import annotations

import json
import socket
from datetime import timedelta
from pathlib import Path

import pytest

from azfs.export import ExportRequest
from managerd.agent_client import AgentAddress, AgentClient
from managerd.auth import Principal
from managerd.config import AgentConfig
from managerd.db import migrate
from managerd.db.models import Agent, now
from managerd.db.session import Database
from managerd.errors import ApiError
from managerd.services.agents import AgentDirectory
from tests.support.etcd import etcd_server  # noqa: F401

ADMIN = Principal(1, "admin", True, 0, 0)


@pytest.fixture
def db(tmp_path: Path):
    database = Database(f"sqlite:///{tmp_path / 'm.db'}", 2)
    migrate.upgrade(database.engine)
    yield database
    database.dispose()


async def test_lookup_order_and_expiry(db: Database, etcd_server) -> None:  # noqa: F811
    client = etcd_server.client()
    lease = client.lease(30)
    client.put("/azfs/agents/node2", json.dumps({"agent_id": "node2",
                                                 "socket": "/run/azfs/n2.sock"}), lease=lease)
    agents = AgentDirectory(db, {"node1": AgentConfig("node1", socket=Path("/run/n1.sock"))},
                            None, etcd_server.endpoint)
    assert (await agents.resolve("node1")).socket == Path("/run/n1.sock")
    assert (await agents.resolve("node2")).socket == Path("/run/azfs/n2.sock")
    client.put("/azfs/agents/node4", json.dumps({"agent_id": "node4", "socket": "/s.sock",
                                                 "url": "http://10.9.9.9:7520"}), lease=lease)
    remote = await agents.resolve("node4")  # a remote agent: its URL wins over its socket
    assert (remote.url, remote.socket) == ("http://10.9.9.9:7520", None)
    lease.revoke()  # a dead agent's key disappears with its lease
    with pytest.raises(ApiError) as err:
        await agents.resolve("node2")
    assert err.value.code == "agent-not-found"

    await agents.register(ADMIN, "node3", None, "http://10.1.2.3:8631", ttl=0)
    assert (await agents.resolve("node3")).url == "http://10.1.2.3:8631"

    def expire(session) -> None:
        session.get(Agent, "node3").expires_at = now() - timedelta(seconds=1)

    db.call(expire)
    with pytest.raises(ApiError) as err:
        await agents.resolve("node3")
    assert err.value.code == "agent-not-found"
    with pytest.raises(ApiError) as err:
        await agents.register(ADMIN, "node1", "/x.sock", None, ttl=10)
    assert err.value.code == "invalid-argument"  # config agents are not overridden


async def test_unreachable_agent_is_an_explicit_error(tmp_path: Path) -> None:
    missing = AgentClient(AgentAddress("gone", socket=tmp_path / "none.sock"), timeout=2)
    with pytest.raises(ApiError) as err:
        await missing.export("k1", ExportRequest())
    assert err.value.code == "agent-unreachable" and err.value.status == 502

    silent_path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as silent:  # accepts, never answers
        silent.bind(str(silent_path))
        silent.listen()
        client = AgentClient(AgentAddress("slow", socket=silent_path), timeout=0.5)
        with pytest.raises(ApiError) as err:
            await client.unexport("k1")
    assert err.value.code == "agent-unreachable" and "did not answer" in err.value.message
