"""Unit tests of agentd's parts that need no daemon: config, path containment, journal."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from agentd.config import Config
from agentd.journal import Journal
from agentd.paths import PathMissing, PathOutsideVolume, check_beneath, open_beneath
from azfs.errors import UserError

# ---- config ------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_config_from_toml_with_all_tables(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef-secret\n")
    config = Config.from_toml(write(tmp_path, f"""
agent_id = "node-1"
state_dir = "{tmp_path}/state"
socket = "{tmp_path}/agent.sock"
socket_mode = "0640"
unmount_on_exit = true
max_body_bytes = "2M"
xattrs = true
listing_entries = 2000000
[store]
etcd = "127.0.0.1:2379"
[cache]
dir = "{tmp_path}/cache"
size = "1G"
[manager]
listen = "127.0.0.1:7520"
secret_file = "{secret}"
"""))
    assert config.agent_id == "node-1"
    assert config.mountpoint == tmp_path / "state" / "fuse"
    assert config.socket_mode == 0o640
    assert config.unmount_on_exit is True
    assert config.max_body_bytes == 2 * 1024 * 1024
    assert config.xattrs is True and config.listing_entries == 2_000_000
    assert config.etcd == "127.0.0.1:2379" and config.volumes_file is None
    assert config.cache_bytes == 1024 ** 3
    assert config.manager_secret().reveal() == "0123456789abcdef-secret"
    assert "0123456789abcdef" not in repr(config.manager_secret())


@pytest.mark.parametrize(("text", "message"), [
    ('stat_dir = "/x"', "unknown key 'stat_dir'"),
    ('[store]\netcd = "a:1"\nvolumes_file = "/v.yaml"', "not both"),
    ('[store]\nzk = "a"', "unknown key 'zk'"),
    ('state_dir = "relative"', "absolute"),
    ('unmount_on_exit = "yes"', "true or false"),
    ('max_body_bytes = "lots"', "max_body_bytes"),
    ('[manager]\nlisten = "0.0.0.0:1"', "secret_file"),
    ('fuse_mountpoint = "/var/lib/azfs/agent/volumes/x"', "volumes/"),
    ("agent_id = [", "agent.toml"),
    ('[cache]\ndir = "/var/cache/azfs"', "both dir and a positive size"),
    ("listing_entries = 10", "listing_entries must be at least 1000"),
    ('xattrs = "on"', "true or false"),
])
def test_config_errors_are_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(UserError) as info:
        Config.from_toml(write(tmp_path, text))
    assert message in str(info.value)
    assert "\n" not in str(info.value).strip()


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        Config.from_toml(tmp_path / "nope.toml")


# ---- path containment ------------------------------------------------------------------------


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    root = tmp_path / "volume"
    (root / "a" / "b").mkdir(parents=True)
    (root / "file").write_text("x")
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "out")
    os.symlink("a", root / "in")
    os.symlink("b", root / "a" / "lb")
    return root


def test_open_beneath_reaches_plain_directories(volume: Path) -> None:
    fd = open_beneath(volume, "a/b")
    try:
        assert os.path.samestat(os.fstat(fd), os.stat(volume / "a" / "b"))
    finally:
        os.close(fd)
    assert check_beneath(volume, "a//b/") == volume / "a" / "b"


@pytest.mark.parametrize("rel", ["out", "in", "a/lb", "out/x", "../volume/a", "/a", "a/../a",
                                 "", ".", "a/.azfs-meta"])
def test_open_beneath_refuses_symlinks_and_escapes(volume: Path, rel: str) -> None:
    with pytest.raises(PathOutsideVolume):
        open_beneath(volume, rel)


@pytest.mark.parametrize("rel", ["missing", "a/missing", "file", "file/x"])
def test_open_beneath_missing_or_not_a_directory(volume: Path, rel: str) -> None:
    with pytest.raises(PathMissing):
        open_beneath(volume, rel)


def test_open_beneath_leaks_no_descriptor(volume: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for rel in ("a/b", "out", "a/missing", "file/x"):
        try:
            os.close(open_beneath(volume, rel))
        except (PathOutsideVolume, PathMissing):
            pass
    assert len(os.listdir("/proc/self/fd")) == before


# ---- journal ---------------------------------------------------------------------------------


async def test_journal_round_trip_atomic_and_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "journal.json"
    journal = Journal.load(path)
    assert journal.kernels == {}
    await journal.put("k2", {"request": {"vfolders": []}, "n": 2})
    await journal.put("k1", {"request": {"vfolders": []}, "n": 1})
    await journal.remove("k2")
    await journal.remove("absent")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text())
    assert data == {"version": 1, "kernels": {"k1": {"request": {"vfolders": []}, "n": 1}}}
    assert Journal.load(path).kernels == data["kernels"]
    assert [p.name for p in path.parent.iterdir()] == ["journal.json"]  # no temp files left


def test_unreadable_journal_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "journal.json"
    path.write_text("{broken")
    with pytest.raises(UserError, match="move it away"):
        Journal.load(path)


# ---- the reconcile gate ----------------------------------------------------------------------


async def test_gate_readers_share_and_a_waiting_writer_goes_first() -> None:
    import trio

    from agentd.exports import _Gate

    gate = _Gate()
    events: list[str] = []
    release_first = trio.Event()

    async def reader(name: str, hold: trio.Event | None = None) -> None:
        async with gate.shared():
            events.append(f"{name} in")
            if hold is not None:
                await hold.wait()
            events.append(f"{name} out")

    async def writer() -> None:
        async with gate.exclusive():
            events.append("writer")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader, "r1", release_first)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(reader, "r2")       # shares with r1
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(writer)             # waits for r1
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(reader, "r3")       # waits behind the writer
        await trio.testing.wait_all_tasks_blocked()
        assert events == ["r1 in", "r2 in", "r2 out"]
        release_first.set()
    assert events == ["r1 in", "r2 in", "r2 out", "r1 out", "writer", "r3 in", "r3 out"]


async def test_gate_cancelled_writer_releases_waiting_readers() -> None:
    import trio

    from agentd.exports import _Gate

    gate = _Gate()
    hold = trio.Event()
    done: list[str] = []

    async def long_reader() -> None:
        async with gate.shared():
            await hold.wait()

    async def reader() -> None:
        async with gate.shared():
            done.append("r2")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(long_reader)
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0.05):
            async with trio.open_nursery() as inner:
                inner.start_soon(_exclusive, gate)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(reader)
                await trio.sleep(1)
        await trio.testing.wait_all_tasks_blocked()
        assert done == ["r2"]
        hold.set()


async def _exclusive(gate) -> None:
    async with gate.exclusive():
        pass


def test_manager_url_registered_for_remote_managers(tmp_path: Path) -> None:
    import socket

    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef-secret\n")
    base = {"manager_secret_file": secret}
    assert Config().manager_url is None
    assert Config(manager_listen="10.0.0.5:7520", **base).manager_url == "http://10.0.0.5:7520"
    assert Config(manager_listen="0.0.0.0:7520", **base).manager_url == \
        f"http://{socket.gethostname()}:7520"
    assert Config(manager_listen="0.0.0.0:7520", manager_advertise="https://n1:443",
                  **base).manager_url == "https://n1:443"
    with pytest.raises(UserError, match="advertise"):
        Config(manager_advertise="n1:7520").validated()
