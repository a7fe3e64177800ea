"""``azfs.volumes.etcd_client.connect_first``: one member down, the next one answers.

Against a real etcd (``tests/support/etcd.py``); the member that is down is
a loopback port nobody listens on.  The agent's registration and the
manager's agent lookup connect through this helper.
"""

# ruff: noqa: F811 - pytest fixtures are imported by name and requested by name

from __future__ import annotations

from pathlib import Path

import pytest
from etcd3.exceptions import ConnectionFailedError

from azfs.secret import Secret
from azfs.volumes.etcd_client import EtcdAuth, connect_first
from tests.support.etcd import EtcdServer, etcd_server, secure_etcd  # noqa: F401
from tests.support.services import free_port


def _down() -> str:
    return f"127.0.0.1:{free_port()}"


def test_the_first_member_down_the_second_answers(etcd_server: EtcdServer) -> None:  # noqa: F811
    client = connect_first(f"{_down()},{etcd_server.endpoint}", timeout=3, auth=EtcdAuth())
    try:
        client.put("/azfs/agents/n1", "here")
    finally:
        client.close()
    raw = etcd_server.client()
    try:
        assert raw.get("/azfs/agents/n1")[0] == b"here"
    finally:
        raw.close()


def test_no_member_answers_the_last_error_is_raised() -> None:
    with pytest.raises(ConnectionFailedError):
        connect_first(f"{_down()},{_down()}", timeout=2, auth=EtcdAuth())


def test_tls_and_login_come_from_the_environment(secure_etcd: EtcdServer, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root = secure_etcd.client()
    try:
        root.put("/azfs/agents/n2", "registered")
    finally:
        root.close()
    password = tmp_path / "etcd.password"
    password.write_text("reader-pw\n")
    tls = secure_etcd.tls_files
    for name, value in (("AZFS_ETCD_CA", tls["ca"]), ("AZFS_ETCD_CERT", tls["cert"]),
                        ("AZFS_ETCD_KEY", tls["key"]), ("AZFS_ETCD_USER", "reader"),
                        ("AZFS_ETCD_PASSWORD_FILE", str(password))):
        monkeypatch.setenv(name, value)
    endpoints = f"{_down()},{secure_etcd.endpoint}"
    client = connect_first(endpoints, timeout=3)
    try:
        assert client.get("/azfs/agents/n2")[0] == b"registered"
    finally:
        client.close()
    wrong = EtcdAuth(user="reader", password=Secret("wrong-pw"), ca_cert=tls["ca"],
                     cert=tls["cert"], key=tls["key"])
    with pytest.raises(Exception, match="authentication failed"):
        connect_first(endpoints, timeout=3, auth=wrong)
