"""TLS between the CLI, the manager and the agents: real daemons on loopback, a CA made here.

``azfs-managerd`` serves HTTPS with a certificate of the cluster's CA and
checks the agents' certificates against that CA; ``azfs-agentd`` serves its
TCP listener with TLS (and, for mutual TLS, asks for the manager's client
certificate).  A second CA stands for anyone else.  Requests work end to
end (the CLI creates a vfolder, the manager exports it through the agent);
an untrusted certificate on either side is refused before any request is
made; a plain-HTTP request to a TLS port gets no HTTP answer, so no token
crosses in clear; and no private key shows up in a log, an argv,
``/proc/mounts`` or an answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from tests.support.agent import AgentHarness
from tests.support.pki import CA, Issued
from tests.support.services import free_port, running

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
AGENT_SECRET = "agent-shared-secret-0123456789"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> SimpleNamespace:
    directory = tmp_path_factory.mktemp("pki")
    cluster, other = CA(directory, "cluster"), CA(directory, "other")
    return SimpleNamespace(
        ca=cluster.cert, other_ca=other.cert, manager=cluster.issue("manager"),
        agent=cluster.issue("agent"), rogue_agent=other.issue("agent"),
        manager_client=cluster.issue("manager-client", server=False, client=True))


def _context(ca: Path, client: Issued | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    return context


class Cluster:
    """One agent (TCP with TLS) and one manager (HTTPS) in ``root``; always stopped."""

    def __init__(self, root: Path, pki: SimpleNamespace, stack: contextlib.ExitStack) -> None:
        self.root, self.pki, self.stack = root, pki, stack
        (root / "node").mkdir()
        self.agent = AgentHarness(root / "node")
        stack.callback(self.agent.cleanup)
        self.agent_port = free_port()
        secret = root / "agent.secret"
        secret.write_text(AGENT_SECRET + "\n")
        secret.chmod(0o600)
        self.secret_file = secret
        self.manager_port = free_port()
        self.url = f"https://127.0.0.1:{self.manager_port}"
        self.manager_log = root / "managerd.log"
        self.admin: str | None = None

    def start_agent(self, cert: Issued, client_ca: Path | None = None) -> None:
        manager = {"listen": f"127.0.0.1:{self.agent_port}", "secret_file": str(self.secret_file),
                   "cert_file": str(cert.cert), "key_file": str(cert.key)}
        if client_ca is not None:
            manager["client_ca_file"] = str(client_ca)
        self.agent.write_config(manager=manager)
        self.agent.start()

    def manager_config(self, client: Issued | None = None) -> Path:
        volumes = self.root / "manager-volumes.yaml"
        volumes.write_text(f"volumes:\n  - name: vol1\n    mount: {{at: requested, fstype: bind, "
                           f"path: {self.agent.sources['vol1']}}}\n")
        lines = [f'listen = "127.0.0.1:{self.manager_port}"',
                 f'state_dir = "{self.root / "manager"}"', f'volumes_file = "{volumes}"',
                 f'tls_cert_file = "{self.pki.manager.cert}"',
                 f'tls_key_file = "{self.pki.manager.key}"',
                 f'agent_ca_file = "{self.pki.ca}"']
        if client is not None:
            lines += [f'agent_cert_file = "{client.cert}"', f'agent_key_file = "{client.key}"']
        lines += ["[agents.node1]", f'url = "https://127.0.0.1:{self.agent_port}"']
        config = self.root / "managerd.toml"
        config.write_text("\n".join(lines) + "\n")
        return config

    def manager_env(self) -> dict[str, str]:
        return {**os.environ, "AZFS_MANAGERD_AGENT_SECRET": AGENT_SECRET}

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/v1/health", verify=_context(self.pki.ca),
                             timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def start_manager(self, client: Issued | None = None) -> contextlib.AbstractContextManager:
        config = self.manager_config(client)
        cmd = [str(BIN / "azfs-managerd"), "--config", str(config)]
        if self.admin is None:
            out = subprocess.run([*cmd, "create-user", "admin", "--admin"], capture_output=True,
                                 text=True, env=self.manager_env(), check=True, timeout=60)
            self.admin = json.loads(out.stdout)["token"]
        return running([*cmd, "serve"], self.manager_log, self.healthy, "azfs-managerd",
                       env=self.manager_env())

    def client(self, ca: Path | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.admin}"},
                            verify=_context(ca or self.pki.ca), timeout=30)

    def azfs(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        full = {k: v for k, v in os.environ.items() if k not in ("AZFS_CA_FILE", "SSL_CERT_FILE")}
        full.update(AZFS_MANAGER_URL=self.url, AZFS_TOKEN=str(self.admin), **env)
        return subprocess.run([str(BIN / "azfs"), *args], env=full, capture_output=True,
                              text=True, timeout=60, cwd=REPO)

    def agent_kernels(self) -> list:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.agent.socket)),
                          base_url="http://agent", timeout=10) as http:
            return http.get("/v1/kernels").json()["kernels"]


@pytest.fixture
def cluster(tmp_path: Path, pki: SimpleNamespace) -> Iterator[Cluster]:
    with contextlib.ExitStack() as stack:
        yield Cluster(tmp_path, pki, stack)


def _export(cluster: Cluster) -> httpx.Response:
    with cluster.client() as c:
        return c.post("/v1/kernels", json={"kernel_id": "k1", "agent": "node1",
                                           "vfolders": [{"vfolder": "data"}]})


def _plain_http_gets_no_answer(port: int, token: str) -> None:
    """A request in clear to a TLS port: no HTTP answer (the handshake fails first)."""
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/v1/health",
                  headers={"Authorization": f"Bearer {token}"}, timeout=5)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /v1/kernels HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + token.encode() + b"\r\n\r\n")
        with contextlib.suppress(OSError):
            reply = sock.recv(4096)
            assert not reply.startswith(b"HTTP/"), reply[:200]


def test_requests_over_tls_work_and_nothing_crosses_in_clear(cluster: Cluster) -> None:
    pki = cluster.pki
    cluster.start_agent(pki.agent)
    with cluster.start_manager():
        # the CLI trusts the cluster's CA when told, by flag or environment
        made = cluster.azfs("folder", "create", "data", "--ca-file", str(pki.ca))
        assert made.returncode == 0, made.stderr
        listed = cluster.azfs("folder", "ls", "--json", AZFS_CA_FILE=str(pki.ca))
        assert listed.returncode == 0, listed.stderr
        assert [v["alias"] for v in json.loads(listed.stdout)] == ["data"]

        # the manager exports through the agent's TLS endpoint, checking its certificate
        r = _export(cluster)
        assert r.status_code == 201, r.text
        assert [k["kernel_id"] for k in cluster.agent_kernels()] == ["k1"]
        with cluster.client() as c:
            assert c.delete("/v1/kernels/k1").status_code == 204
            agents = c.get("/v1/agents").text
        assert cluster.agent_kernels() == []

        # a client that does not trust the cluster's CA is refused, and says why
        untrusted = cluster.azfs("folder", "ls")
        assert untrusted.returncode == 1
        assert "certificate is not trusted" in untrusted.stderr and "--ca-file" in untrusted.stderr
        assert "Traceback" not in untrusted.stderr
        assert len(untrusted.stderr.strip().splitlines()) == 1
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"), \
                cluster.client(ca=pki.other_ca) as c:
            c.get("/v1/users/me")

        # plain HTTP to either TLS port: no answer, so the token never travels in clear
        _plain_http_gets_no_answer(cluster.manager_port, str(cluster.admin))
        _plain_http_gets_no_answer(cluster.agent_port, AGENT_SECRET)

        # no private key in an argv, a log or an answer
        keys = [pki.manager.key_text(), pki.agent.key_text()]
        bodies = [k.splitlines()[1] for k in keys]  # the first line of base64 of each key
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError):
                line = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                assert not any(b in line for b in bodies)
        texts = [cluster.manager_log.read_text(), cluster.agent.log.read_text(), agents,
                 Path("/proc/self/mounts").read_text(),
                 made.stdout + made.stderr, listed.stdout, untrusted.stderr]
        for text in texts:
            assert not any(b in text for b in bodies)
            assert AGENT_SECRET not in text


def test_an_agent_certificate_of_another_ca_is_refused(cluster: Cluster) -> None:
    cluster.start_agent(cluster.pki.rogue_agent)
    with cluster.start_manager():
        assert cluster.azfs("folder", "create", "data", "--ca-file",
                            str(cluster.pki.ca)).returncode == 0
        r = _export(cluster)
        assert r.status_code == 502, r.text
        error = r.json()["error"]
        assert error["code"] == "agent-unreachable"
        assert "CERTIFICATE_VERIFY_FAILED" in error["message"]
        # nothing recorded, nothing exported, nothing sent: the handshake failed first
        with cluster.client() as c:
            assert c.get("/v1/kernels").json() == []
            assert c.get("/v1/vfolders/data").json()["status"] == "ready"
        assert cluster.agent_kernels() == []
    assert "Authorization" not in cluster.agent.log.read_text()


def test_mutual_tls_needs_the_managers_client_certificate(cluster: Cluster) -> None:
    pki = cluster.pki
    cluster.start_agent(pki.agent, client_ca=pki.ca)
    # even with the shared secret, a client without a certificate gets no answer
    with pytest.raises(httpx.HTTPError), \
            httpx.Client(verify=_context(pki.ca), timeout=10) as http:
        http.get(f"https://127.0.0.1:{cluster.agent_port}/v1/kernels",
                 headers={"Authorization": f"Bearer {AGENT_SECRET}"})
    with cluster.start_manager():  # no client certificate configured
        assert cluster.azfs("folder", "create", "data", "--ca-file", str(pki.ca)).returncode == 0
        r = _export(cluster)
        assert r.status_code == 502 and r.json()["error"]["code"] == "agent-unreachable", r.text
        assert cluster.agent_kernels() == []
    with cluster.start_manager(client=pki.manager_client):
        r = _export(cluster)
        assert r.status_code == 201, r.text
        assert [k["kernel_id"] for k in cluster.agent_kernels()] == ["k1"]
        with cluster.client() as c:
            assert c.delete("/v1/kernels/k1").status_code == 204
    # a client certificate of the cluster's CA, with the secret: the agent answers
    with httpx.Client(verify=_context(pki.ca, pki.manager_client), timeout=10) as http:
        r = http.get(f"https://127.0.0.1:{cluster.agent_port}/v1/kernels",
                     headers={"Authorization": f"Bearer {AGENT_SECRET}"})
    assert r.status_code == 200 and r.json() == {"kernels": []}


def test_bad_tls_files_stop_the_daemons_with_one_clear_line(cluster: Cluster,
                                                            tmp_path: Path) -> None:
    pki = cluster.pki
    # a key every user of the host can read: the agent refuses to start on it
    loose = Issued(tmp_path / "loose.pem", tmp_path / "loose.key")
    loose.cert.write_bytes(pki.agent.cert.read_bytes())
    loose.key.write_bytes(pki.agent.key.read_bytes())
    loose.key.chmod(0o644)
    cluster.agent.write_config(manager={
        "listen": f"127.0.0.1:{cluster.agent_port}", "secret_file": str(cluster.secret_file),
        "cert_file": str(loose.cert), "key_file": str(loose.key)})
    done = subprocess.run([sys.executable, "-m", "agentd.main", "--config",
                           str(cluster.agent.config_file)], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 1
    out = done.stdout + done.stderr
    assert f"chmod 0600 {loose.key}" in out and "Traceback" not in out
    assert pki.agent.key_text().splitlines()[1] not in out
    assert cluster.agent.mounts() == []  # refused before anything was mounted

    # a certificate with another's key: the manager says which files do not match
    config = cluster.manager_config()
    text = config.read_text().replace(str(pki.manager.key), str(pki.agent.key))
    config.write_text(text)
    done = subprocess.run([str(BIN / "azfs-managerd"), "--config", str(config), "serve"],
                          capture_output=True, text=True, timeout=60,
                          env=cluster.manager_env())
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("azfs-managerd: manager TLS: cannot use certificate ")
    assert len(done.stderr.strip().splitlines()) == 1
    assert pki.agent.key_text().splitlines()[1] not in done.stderr
