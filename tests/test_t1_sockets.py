"""``azfs.sockets.bind_unix``: control sockets that appear with their final mode and group.

Real unix sockets in a temporary directory, with a real client connecting.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from azfs.sockets import bind_unix


def _roundtrip(path: Path, server: socket.socket) -> bytes:
    """Connects as soon as the path is there: the socket listens before it appears."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(str(path))
        conn, _ = server.accept()
        with conn:
            client.sendall(b"ping")
            return conn.recv(4)


def test_the_socket_is_at_its_path_with_its_mode_and_serves(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    with bind_unix(path, 0o660) as server:
        st = path.lstat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert _roundtrip(path, server) == b"ping"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.sock"]  # no temporary left


def test_the_default_mode_is_owner_only_and_the_umask_is_restored(tmp_path: Path) -> None:
    previous = os.umask(0o000)
    try:
        with bind_unix(tmp_path / "s"):
            assert stat.S_IMODE((tmp_path / "s").lstat().st_mode) == 0o600
        assert os.umask(0o000) == 0o000  # what bind_unix found is what it left
    finally:
        os.umask(previous)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file another group needs root")
def test_the_group_is_set_before_the_socket_appears(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    with bind_unix(path, 0o660, gid=4242):
        assert path.lstat().st_gid == 4242


def test_a_stale_socket_or_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "fusehost.sock"
    old = bind_unix(path)
    old.close()  # an earlier run's socket, nobody listening
    with bind_unix(path) as server:
        assert _roundtrip(path, server) == b"ping"
    path.unlink()
    path.write_text("not a socket")
    with bind_unix(path) as server:
        assert stat.S_ISSOCK(path.lstat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fusehost.sock"]


def test_a_failed_bind_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(OSError):
        bind_unix(target)  # a non-empty directory cannot be replaced by the socket
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    with pytest.raises(FileNotFoundError):
        bind_unix(tmp_path / "missing" / "s")
