"""The processes of a single node: how each is started and how it is known to be ready.

etcd (only with ``--etcd local``), Azurite, managerd and agentd, each a
:class:`~azfs.node.procs.Service` whose readiness check is the service's
own health answer: etcd's ``/health``, Azurite's port, managerd's
``/v1/health``, agentd's ``/v1/health`` on its unix socket.  The daemons get
this process's environment minus the variables that would override their
config files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
from pathlib import Path

import httpx

from azfs.errors import UserError
from azfs.node.layout import STORAGE_ACCOUNT, Layout, Settings, read_secret
from azfs.node.procs import Service, ServiceFailed

#: the order of ``up``; ``down`` goes the other way
SERVICES = ("etcd", "azurite", "managerd", "agentd")


def _repo_node_bin() -> Path:
    return Path(__file__).resolve().parents[2] / ".cache" / "node" / "node_modules" / ".bin"


def azurite_binary() -> str:
    """``azurite-blob``: $AZFS_AZURITE, PATH, the checkout's npm cache, /opt/azfs."""
    candidates = [os.environ.get("AZFS_AZURITE"), shutil.which("azurite-blob"),
                  str(_repo_node_bin() / "azurite-blob"),
                  "/opt/azfs/node/node_modules/.bin/azurite-blob"]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise UserError("azurite-blob not found: run packaging/setup-env.sh (it installs Azurite "
                    "from npm) or set AZFS_AZURITE")


def _daemon_env() -> dict[str, str]:
    """The environment for the daemons: ours, minus what would override their configs."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("AZFS_MANAGERD_", "AZURE_STORAGE_", "AZURITE_"))
            and k not in ("AZFS_TOKEN", "AZFS_ETCD")}


def _http_ok(url: str, expect: bytes | None = None) -> bool:
    try:
        response = httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and (expect is None or expect in response.content)


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def _agent_ok(layout: Layout) -> bool:
    if not layout.agent_socket.exists():
        return False
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(layout.agent_socket)),
                          base_url="http://agent", timeout=5) as client:
            return client.get("/v1/health").status_code == 200
    except httpx.HTTPError:
        return False


def _agent_health(layout: Layout) -> str | None:
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(layout.agent_socket)),
                          base_url="http://agent", timeout=5) as client:
            return f"agent health: {client.get('/v1/health').text.strip()}"
    except httpx.HTTPError:
        return None


def services(layout: Layout, settings: Settings, azurite: str = "azurite-blob"
             ) -> dict[str, Service]:
    """The node's services (etcd only with ``--etcd local``); ``azurite``: its binary."""
    marker = f"{layout.root}/"
    env = _daemon_env()
    found: dict[str, Service] = {}
    if settings.etcd == "local":
        client = f"http://127.0.0.1:{settings.etcd_port}"
        peer = f"http://127.0.0.1:{settings.etcd_peer_port}"
        found["etcd"] = Service(
            "etcd", [shutil.which("etcd") or "/usr/bin/etcd", "--name", "azfs-node",
                     "--data-dir", str(layout.etcd_data), "--listen-client-urls", client,
                     "--advertise-client-urls", client, "--listen-peer-urls", peer,
                     "--initial-advertise-peer-urls", peer,
                     "--initial-cluster", f"azfs-node={peer}", "--log-level", "warn",
                     "--logger", "zap"],
            layout.pid_file("etcd"), layout.log("etcd"), marker,
            ready=lambda: _http_ok(f"{client}/health", b"true"), env=env)
    azurite_env = dict(env)
    if layout.storage_key.exists():  # made by `up`; the key is given in the environment only
        azurite_env["AZURITE_ACCOUNTS"] = \
            f"{STORAGE_ACCOUNT}:{read_secret(layout.storage_key).reveal()}"
    found["azurite"] = Service(
        "azurite", [azurite, "--blobHost", "127.0.0.1",
                    "--blobPort", str(settings.azurite_port),
                    "--location", str(layout.azurite_data), "--skipApiVersionCheck",
                    # no access log: its request lines would carry the kernels' SAS
                    "--silent", "--disableTelemetry"],
        layout.pid_file("azurite"), layout.log("azurite"), marker,
        ready=lambda: _port_open(settings.azurite_port), env=azurite_env)
    found["managerd"] = Service(
        "managerd", [sys.executable, "-m", "managerd.main", "--config",
                     str(layout.manager_toml), "serve"],
        layout.pid_file("managerd"), layout.log("managerd"), marker,
        ready=lambda: _http_ok(f"{settings.manager_url}/v1/health"), env=env)
    found["agentd"] = Service(
        "agentd", [sys.executable, "-m", "agentd.main", "--config", str(layout.agent_toml)],
        layout.pid_file("agentd"), layout.log("agentd"), marker,
        ready=lambda: _agent_ok(layout), env=env, diagnose=lambda: _agent_health(layout))
    return found


def ports(settings: Settings) -> dict[str, list[tuple[int, str]]]:
    ports = {"azurite": [(settings.azurite_port, "--azurite-port")],
             "managerd": [(settings.manager_port, "--manager-port")]}
    if settings.etcd == "local":
        ports["etcd"] = [(settings.etcd_port, "--etcd-port"),
                         (settings.etcd_peer_port, "--etcd-port (+1)")]
    return ports


def check_port_free(port: int, flag: str, service: str) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise ServiceFailed(f"cannot start {service}: port {port} on 127.0.0.1 is in use "
                                f"by another program (choose another with {flag})") from None
