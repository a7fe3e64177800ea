"""Usage accounting of a posix vfolder: exact after unmount, remount and crash.

The truth is a walk of the source: apparent sizes of regular files (each inode
once) and the count of all objects except the root and the ledger directory.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from tests.support.fuse import alive, azfs, azfs_argv, is_mounted, wait_for

K = 1024


def true_usage(root: Path) -> tuple[int, int]:
    seen: set[int] = set()
    size = count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root and ".azfs-meta" in dirnames:
            dirnames.remove(".azfs-meta")
        for name in dirnames + filenames:
            st = os.lstat(Path(dirpath) / name)
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
            count += 1
            if stat.S_ISREG(st.st_mode):
                size += st.st_size
    return size, count


def usage(m) -> dict:
    res = azfs("usage", "--json", str(m.source), env=m.env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def build_tree(mnt: Path) -> None:
    """A bit of everything, through the mount."""
    (mnt / "a" / "b" / "c").mkdir(parents=True)
    (mnt / "a" / "f1").write_bytes(b"1" * 1000)
    (mnt / "a" / "b" / "f2").write_bytes(b"2" * 70 * K)
    (mnt / "big").write_bytes(os.urandom(300 * K))
    os.link(mnt / "big", mnt / "a" / "big-link")
    os.link(mnt / "big", mnt / "a" / "b" / "c" / "big-link2")
    os.symlink("big", mnt / "sym")
    os.symlink("/nowhere/at/all", mnt / "a" / "dangling")
    os.mkfifo(mnt / "a" / "fifo")
    fd = os.open(mnt / "sparse", os.O_CREAT | os.O_WRONLY)
    os.pwrite(fd, b"end", 5 * 1024 * K)
    os.close(fd)
    (mnt / "shrunk").write_bytes(b"s" * 50 * K)
    os.truncate(mnt / "shrunk", 10)
    (mnt / "grown").write_bytes(b"g")
    os.truncate(mnt / "grown", 7777)
    (mnt / "gone").write_bytes(b"x" * 9999)
    os.unlink(mnt / "gone")
    (mnt / "old").write_bytes(b"o" * 20 * K)
    (mnt / "new").write_bytes(b"n" * 3)
    os.rename(mnt / "new", mnt / "old")
    (mnt / "dir-gone" / "sub").mkdir(parents=True)
    os.rmdir(mnt / "dir-gone" / "sub")
    os.rmdir(mnt / "dir-gone")
    with open(mnt / "appended", "ab") as f:
        f.write(b"x" * 5000)
    with open(mnt / "appended", "ab") as f:
        f.write(b"y" * 5000)
    with open(mnt / "a" / "f1", "r+b") as f:
        f.seek(500)
        f.write(b"z" * 100)  # overwrite: no growth
    (mnt / "d-link-target").write_bytes(b"t" * 1234)
    os.link(mnt / "d-link-target", mnt / "d-link")
    os.unlink(mnt / "d-link-target")  # the inode stays, once


TIGHT_DESCRIPTORS = ["setpriv", "--bounding-set", "-sys_resource",
                     "prlimit", "--nofile=300:300", "--"]


@pytest.mark.parametrize("prefix", [[], TIGHT_DESCRIPTORS], ids=["default", "tight-fds"])
def test_usage_after_umount_matches_the_tree(mounted, prefix):
    m = mounted(prefix=prefix)
    if prefix:  # most nodes evicted while the tree is built
        for i in range(200):
            (m.mnt / f"pad{i}").touch()
    assert usage(m)["in_use"] is True
    build_tree(m.mnt)
    m.umount()
    got = usage(m)
    assert got["in_use"] is False
    assert (got["bytes"], got["files"]) == true_usage(m.source)


def test_usage_is_kept_while_mounted(mounted):
    m = mounted()
    build_tree(m.mnt)
    m.umount()
    m.mount()
    (m.mnt / "more").write_bytes(b"m" * 4000)
    os.unlink(m.mnt / "big")
    m.umount()
    assert (usage(m)["bytes"], usage(m)["files"]) == true_usage(m.source)


def test_remount_of_a_clean_ledger_needs_no_scan(mounted):
    m = mounted()
    build_tree(m.mnt)
    m.umount()
    expected = true_usage(m.source)
    m.log.write_text("")
    m.mount()
    (m.mnt / "extra").write_bytes(b"e" * 10)
    m.umount()
    assert "rebuilt by a scan" not in m.log_text()
    assert (usage(m)["bytes"], usage(m)["files"]) == (expected[0] + 10, expected[1] + 1)
    assert (usage(m)["bytes"], usage(m)["files"]) == true_usage(m.source)


def test_usage_after_a_crash_is_rebuilt(mounted):
    m = mounted()
    (m.mnt / "before").write_bytes(b"b" * 1000)
    m.umount()
    m.mount()
    build_tree(m.mnt)  # the ledger on disk lags behind these
    m.kill()
    assert usage(m)["in_use"] is True  # not cleanly closed
    m.log.write_text("")
    m.mount()
    assert "rebuilt by a scan" in m.log_text()
    m.umount()
    assert (usage(m)["bytes"], usage(m)["files"]) == true_usage(m.source)


def test_usage_quota_survives_remount(mounted):
    m = mounted("--quota-bytes", "100K")
    (m.mnt / "f").write_bytes(b"f" * 90 * K)
    m.remount()
    fd = os.open(m.mnt / "g", os.O_CREAT | os.O_WRONLY)
    try:
        try:
            os.write(fd, b"g" * 20 * K)
        except OSError as exc:
            assert exc.errno == 122  # EDQUOT
        else:
            raise AssertionError("quota forgotten after remount")
    finally:
        os.close(fd)


def test_usage_of_files_removed_while_open(mounted):
    """Data written to a file after its last name went is not counted once it is closed."""
    m = mounted()
    fd = os.open(m.mnt / "tmp", os.O_CREAT | os.O_RDWR)
    try:
        os.write(fd, b"x" * 10 * K)
        os.unlink(m.mnt / "tmp")
        os.write(fd, b"y" * 20 * K)
        os.ftruncate(fd, 25 * K)
    finally:
        os.close(fd)
    m.umount()
    assert (usage(m)["bytes"], usage(m)["files"]) == true_usage(m.source) == (0, 0)


def test_read_only_inspection_mount_leaves_the_ledger_alone(mounted):
    rw = mounted()
    (rw.mnt / "before").write_bytes(b"b" * 100)
    ro = mounted("--ro", source=rw.source)
    assert (ro.mnt / "before").read_bytes() == b"b" * 100
    (rw.mnt / "during").write_bytes(b"d" * 1000)
    rw.umount()
    ro.umount()
    got = usage(rw)
    assert (got["bytes"], got["files"]) == true_usage(rw.source) == (1100, 2)


def test_second_rw_mount_of_a_source_is_refused_or_counted(mounted):
    first = mounted()
    (first.mnt / "one").write_bytes(b"1" * 100)
    try:
        second = mounted(source=first.source)
    except RuntimeError:
        return  # refused: fine
    (second.mnt / "two").write_bytes(b"2" * 1000)
    second.umount()
    first.umount()
    got = usage(first)
    assert (got["bytes"], got["files"]) == true_usage(first.source)


def test_usage_of_a_directory_never_served(tmp_path):
    res = azfs("usage", str(tmp_path))
    assert res.returncode != 0
    assert len(res.stderr.strip().splitlines()) == 1
    assert "unknown" in res.stderr
    res = azfs("usage", str(tmp_path / "missing"))
    assert res.returncode != 0
    assert len(res.stderr.strip().splitlines()) == 1


def test_crash_of_an_unreaped_daemon_is_detected(mounted, tmp_path):
    """A daemon killed but not yet reaped by its parent (a zombie) holds nothing."""
    src, mnt = tmp_path / "zsrc", tmp_path / "zmnt"
    src.mkdir()
    mnt.mkdir()
    env = dict(os.environ, AZFS_RUN_DIR=str(tmp_path / "zrun"))
    proc = subprocess.Popen(azfs_argv() + ["mount", "--foreground", str(src), str(mnt)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_for(lambda: is_mounted(mnt) or proc.poll() is not None, what="mount")
        (mnt / "f").write_bytes(b"x" * 5000)  # not yet merged into the ledger
        os.kill(proc.pid, signal.SIGKILL)
        wait_for(lambda: not alive(proc.pid), what="daemon death")  # a zombie: not reaped
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        m = mounted(source=src, mnt=mnt)
        m.umount()
        assert (usage(m)["bytes"], usage(m)["files"]) == true_usage(src) == (5000, 1)
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        proc.kill()
        proc.wait()
