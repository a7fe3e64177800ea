"""The network-share stand-in itself (tests/support/slowfs.py), on real FUSE mounts.

Other tests freeze and slow it to prove azfs isolates volumes; these prove
the fixture does what they rely on: it passes data and metadata through,
delays every request (measured as a lower bound only), serves requests
concurrently, keeps its inode table exact, blocks callers while frozen, and
leaves nothing mounted or running after cleanup.
"""
# ruff: noqa: F811 - pytest fixtures are imported by name and requested by name

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from azfs.volumes.mountinfo import is_mounted
from tests.support.slowfs import REPO, SlowVolume, process_state, slow_volume, slowfs  # noqa: F401

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE allow_other)")

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: Path, new: Path, flags: int) -> int:
    """The errno of ``renameat2(old, new, flags)``, 0 on success."""
    ret = _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags)
    return ctypes.get_errno() if ret else 0


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def drop_dentries() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("2\n")


def test_data_and_metadata_pass_through(slowfs) -> None:
    vol = slowfs(latency_ms=1)
    mnt, src = vol.mountpoint, vol.source
    (mnt / "a.txt").write_bytes(b"hello" * 1000)
    assert (src / "a.txt").read_bytes() == b"hello" * 1000
    (src / "direct.txt").write_bytes(b"from the source")
    assert (mnt / "direct.txt").read_bytes() == b"from the source"

    fd = os.open(mnt / "direct.txt", os.O_RDONLY | os.O_NOFOLLOW)  # as containment opens
    assert os.read(fd, 4) == b"from"
    os.close(fd)
    with open(mnt / "a.txt", "r+b") as f:
        f.seek(2)
        f.write(b"XY")
        f.flush()
        os.fsync(f.fileno())
    assert (src / "a.txt").read_bytes()[:6] == b"heXYoh"

    (mnt / "d1" / "d2").mkdir(parents=True)
    os.rename(mnt / "a.txt", mnt / "d1" / "d2" / "b.txt")
    os.rename(mnt / "d1", mnt / "e1")  # objects known below a renamed dir stay reachable
    assert (mnt / "e1" / "d2" / "b.txt").read_bytes()[:6] == b"heXYoh"
    assert (src / "e1" / "d2" / "b.txt").exists()

    os.symlink("e1/d2/b.txt", mnt / "ln")
    assert os.readlink(mnt / "ln") == "e1/d2/b.txt"
    assert (mnt / "ln").read_bytes()[:2] == b"he"
    os.link(mnt / "e1" / "d2" / "b.txt", mnt / "hard")
    assert os.stat(mnt / "hard").st_nlink == 2
    assert os.stat(mnt / "hard").st_ino == os.stat(mnt / "e1" / "d2" / "b.txt").st_ino

    os.chmod(mnt / "hard", 0o640)
    os.truncate(mnt / "hard", 3)
    os.utime(mnt / "hard", ns=(1_000_000_000, 2_000_000_007))
    os.chown(mnt / "hard", 1234, 5678)
    os.chown(mnt / "ln", 4321, 8765, follow_symlinks=False)
    st = os.stat(src / "e1" / "d2" / "b.txt")
    assert (stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns, st.st_uid, st.st_gid) == \
        (0o640, 3, 2_000_000_007, 1234, 5678)
    assert os.lstat(src / "ln").st_uid == 4321

    os.setxattr(mnt / "hard", "user.tag", b"v1")
    assert os.getxattr(mnt / "hard", "user.tag") == b"v1"
    assert os.getxattr(src / "hard", "user.tag") == b"v1"
    assert "user.tag" in os.listxattr(mnt / "hard")
    os.removexattr(mnt / "hard", "user.tag")
    with pytest.raises(OSError) as exc:
        os.getxattr(mnt / "hard", "user.tag")
    assert exc.value.errno == errno.ENODATA
    with pytest.raises(OSError) as exc:
        os.setxattr(mnt / "hard", "trusted.x", b"1")
    assert exc.value.errno == errno.EOPNOTSUPP

    os.mkfifo(mnt / "fifo")
    assert stat.S_ISFIFO(os.lstat(src / "fifo").st_mode)

    (mnt / "other").write_text("other")
    assert renameat2(mnt / "other", mnt / "hard", RENAME_NOREPLACE) == errno.EEXIST
    assert renameat2(mnt / "other", mnt / "hard", RENAME_EXCHANGE) == 0
    assert (src / "hard").read_text() == "other"
    assert (src / "other").read_bytes() == b"heX"

    names = {f"f{i:04d}" for i in range(300)}  # more than one readdir reply
    (mnt / "many").mkdir()
    for name in names:
        (src / "many" / name).write_bytes(b"")
    assert set(os.listdir(mnt / "many")) == names

    os.unlink(mnt / "other")
    with pytest.raises(OSError) as exc:
        os.rmdir(mnt / "e1" / "d2")
    assert exc.value.errno == errno.ENOTEMPTY
    os.unlink(mnt / "e1" / "d2" / "b.txt")
    os.rmdir(mnt / "e1" / "d2")
    assert not (src / "e1" / "d2").exists()
    assert os.statvfs(mnt).f_blocks == os.statvfs(src).f_blocks


def test_unlinked_open_file_keeps_working(slowfs) -> None:
    vol = slowfs()
    path = vol.mountpoint / "tmp"
    with open(path, "w+b") as f:
        os.unlink(path)
        f.write(b"still here")
        f.flush()
        f.seek(0)
        assert f.read() == b"still here"
        assert os.fstat(f.fileno()).st_nlink == 0
    assert os.listdir(vol.source) == []


def test_every_request_is_delayed(slowfs) -> None:
    vol = slowfs(latency_ms=0)
    for i in range(10):
        (vol.source / f"s{i}").write_bytes(b"")
    vol.set_latency(40)
    assert vol.status()["latency_ms"] == 40
    before = vol.requests()
    start = time.monotonic()
    for i in range(10):
        os.lstat(vol.mountpoint / f"s{i}")  # never looked up before: one lookup each
    elapsed = time.monotonic() - start
    assert vol.requests() - before >= 10
    assert elapsed >= 10 * 0.040  # a lower bound only


def test_bad_latency_is_refused_and_changes_nothing(slowfs) -> None:
    vol = slowfs(latency_ms=3)
    with pytest.raises(ValueError, match="latency"):
        vol.set_latency(-1)
    assert vol.status()["latency_ms"] == 3
    res = subprocess.run([sys.executable, "-m", "tests.support.slowfs", str(vol.source),
                          str(vol.source), "--latency-ms", "nan"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "latency" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "tests.support.slowfs",
                          str(vol.source / "missing"), str(vol.source)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "not a directory" in res.stderr and "Traceback" not in res.stderr
    assert not is_mounted(vol.source)


def test_concurrent_requests_overlap(slowfs) -> None:
    vol = slowfs(latency_ms=0)
    for i in range(8):
        (vol.source / f"d{i}").mkdir()
        (vol.source / f"d{i}" / "f").write_bytes(b"")
        os.stat(vol.mountpoint / f"d{i}")
    vol.set_latency(300)
    vol.status(reset_peak=True)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait(10)
            # one directory each: the kernel serializes lookups within a directory
            # (see the module docstring of tests/support/slowfs.py)
            os.lstat(vol.mountpoint / f"d{i}" / "f")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    # served one at a time, no two requests would ever be in flight together
    assert vol.status()["in_flight_max"] >= 2


def forget_all(vol: SlowVolume) -> None:
    deadline = time.monotonic() + 30
    while vol.status()["nodes"] != 1:  # forgets arrive asynchronously, in batches
        assert time.monotonic() < deadline, "the kernel did not forget every inode"
        drop_dentries()
        time.sleep(0.5)


def test_inode_table_returns_to_baseline_after_forget(slowfs) -> None:
    vol = slowfs(latency_ms=0, cache_timeout=0)
    (vol.source / "dir").mkdir()
    for i in range(200):
        (vol.source / "dir" / f"n{i}").write_bytes(b"x")
    assert (vol.mountpoint / "dir" / "n0").read_bytes() == b"x"  # warm up (splice pipes)
    forget_all(vol)
    baseline_fds = len(os.listdir(f"/proc/{vol.pid}/fd"))
    for i in range(50):
        os.stat(vol.mountpoint / "dir" / f"n{i}")
    with os.scandir(vol.mountpoint / "dir") as entries:  # readdirplus counts lookups too
        assert sum(1 for _ in entries) == 200
    with open(vol.mountpoint / "dir" / "n1", "rb") as f:
        assert f.read() == b"x"
    assert vol.status()["nodes"] >= 202
    forget_all(vol)
    assert len(os.listdir(f"/proc/{vol.pid}/fd")) == baseline_fds
    assert (vol.mountpoint / "dir" / "n7").read_bytes() == b"x"  # and found again


def test_freeze_blocks_callers_until_thaw(slowfs) -> None:
    vol = slowfs(latency_ms=1)
    (vol.source / "f").write_bytes(b"")
    vol.freeze()
    assert process_state(vol.pid) == "T"
    with pytest.raises(RuntimeError, match="frozen"):
        vol.set_latency(2)
    caller = subprocess.Popen(["stat", str(vol.mountpoint / "f")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            caller.wait(timeout=1.5)  # still blocked while frozen
        vol.thaw()
        assert caller.wait(timeout=30) == 0
    finally:
        vol.thaw()
        if caller.poll() is None:
            caller.kill()
            caller.wait()


def test_cleanup_leaves_nothing_mounted_even_frozen_and_busy(tmp_path: Path) -> None:
    frozen = slow_volume(tmp_path, 1)
    (frozen.mountpoint / "held").write_bytes(b"x")
    # another process keeps a file open (this one must not: closing it would block)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               f"f = open({str(frozen.mountpoint / 'held')!r})\n"
                               "print('open', flush=True)\ntime.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    copy = tmp_path / "bound"  # as an agent bind-mounts a volume
    copy.mkdir()
    subprocess.run(["mount", "--bind", str(frozen.mountpoint), str(copy)], check=True)
    try:
        assert holder.stdout.readline() == "open\n"
        frozen.freeze()
        crashed = slow_volume(tmp_path, 1)
        crashed.proc.kill()
        crashed.proc.wait(10)
        for vol in (frozen, crashed):
            vol.cleanup()
            assert not is_mounted(vol.mountpoint)
            assert vol.proc.poll() is not None, "daemon still running after cleanup"
        assert not is_mounted(copy)
    finally:
        frozen.cleanup()
        holder.kill()
        holder.wait(30)


def test_fixture_context_manager(tmp_path: Path) -> None:
    with slow_volume(tmp_path, 0) as vol:
        assert isinstance(vol, SlowVolume)
        (vol.mountpoint / "x").write_text("y")
        pid = vol.pid
    assert not is_mounted(vol.mountpoint)
    assert process_state(pid) in ("", "Z")
    assert (vol.source / "x").read_text() == "y"
