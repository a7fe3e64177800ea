"""Every FUSE operation of a posix vfolder, through a real mount made by ``azfs mount``.

Each test checks what a program sees through the mount and, where it matters,
what landed in the source directory.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from azfs.volumes.mountinfo import find_mount
from tests.support.fuse import as_user, errno_of
from tests.support.poll import wait_until

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: Path, new: Path, flags: int) -> None:
    rc = _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# ---- the mount itself ---------------------------------------------------------------------
def test_mount_options_and_type(mounted):
    m = mounted()
    entry = find_mount(m.mnt)
    assert entry is not None
    assert entry.fstype == "fuse.azfs"
    assert entry.source == "azfs"
    opts = entry.super_options.split(",")
    assert "allow_other" in opts
    assert "default_permissions" in opts


def test_readdir_lists_dot_entries_and_names(mounted):
    m = mounted()
    (m.source / "f").write_text("x")
    (m.source / "d").mkdir()
    out = subprocess.run(["ls", "-a1", str(m.mnt)], capture_output=True, text=True, check=True)
    assert sorted(out.stdout.split()) == [".", "..", "d", "f"]
    with os.scandir(m.mnt) as it:
        kinds = {e.name: (e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False))
                 for e in it}
    assert kinds == {"d": (True, False), "f": (False, True)}


def test_readdir_under_concurrent_changes(mounted):
    """A listing taken while names come and go never repeats a name nor misses a stable one."""
    m = mounted()
    stable = {f"stable-{i:04d}-{'x' * 40}" for i in range(1500)}
    for name in stable:
        (m.source / name).touch()
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        i = 0
        try:
            while not stop.is_set():
                p = m.mnt / f"churn-{i % 300:04d}-{'y' * 40}"
                if i // 300 % 2 == 0:
                    p.touch()
                else:
                    p.unlink()
                i += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(15):
            names = os.listdir(m.mnt)
            assert len(names) == len(set(names)), "a name was returned twice"
            assert stable <= set(names), "a name that existed throughout was missed"
    finally:
        stop.set()
        t.join()
    assert not errors


# ---- attributes ------------------------------------------------------------------------------
def test_getattr_matches_source(mounted):
    m = mounted()
    (m.source / "f").write_bytes(b"a" * 12345)
    os.utime(m.source / "f", ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
    a, b = os.stat(m.mnt / "f"), os.stat(m.source / "f")
    assert (a.st_size, a.st_mode, a.st_nlink, a.st_uid, a.st_gid) == \
           (b.st_size, b.st_mode, b.st_nlink, b.st_uid, b.st_gid)
    assert (a.st_mtime_ns, a.st_atime_ns) == (b.st_mtime_ns, b.st_atime_ns)
    assert errno_of(lambda: os.stat(m.mnt / "missing")) == errno.ENOENT


def test_chmod_truncate_utimens(mounted):
    m = mounted()
    p = m.mnt / "f"
    p.write_bytes(b"0123456789")
    os.chmod(p, 0o640)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(m.source / "f").st_mode) == 0o640
    os.truncate(p, 4)
    assert os.stat(p).st_size == 4
    assert (m.source / "f").read_bytes() == b"0123"
    os.truncate(p, 8)
    assert p.read_bytes() == b"0123\0\0\0\0"
    os.utime(p, ns=(1_000_000_000_000_000_001, 1_100_000_000_000_000_002))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000_000_000_001,
                                                1_100_000_000_000_000_002)
    assert os.stat(m.source / "f").st_mtime_ns == 1_100_000_000_000_000_002
    before = time.time_ns()
    os.utime(p)  # UTIME_NOW
    assert os.stat(m.source / "f").st_mtime_ns >= before - 10**9
    d = m.mnt / "d"
    d.mkdir()
    assert errno_of(lambda: os.truncate(d, 0)) == errno.EISDIR


def test_chown_passes_through_without_uid(mounted):
    m = mounted()
    p = m.mnt / "f"
    p.touch()
    os.chown(p, 1234, 5678)
    st = os.stat(m.source / "f")
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert (os.stat(p).st_uid, os.stat(p).st_gid) == (1234, 5678)


def test_uid_gid_presented(mounted):
    m = mounted("--uid", "1000", "--gid", "1001")
    (m.source / "f").touch()
    (m.source / "d").mkdir()
    for name in ("f", "d", "."):
        st = os.stat(m.mnt / name)
        assert (st.st_uid, st.st_gid) == (1000, 1001)
    assert errno_of(lambda: os.chown(m.mnt / "f", 1234, -1)) == errno.EPERM
    assert errno_of(lambda: os.chown(m.mnt / "f", -1, 4321)) == errno.EPERM
    os.chown(m.mnt / "f", 1000, 1001)  # the shown owner: accepted
    assert os.stat(m.source / "f").st_uid == 0  # not stored


# ---- directories -----------------------------------------------------------------------------
def test_mkdir_rmdir(mounted):
    m = mounted()
    d = m.mnt / "d"
    os.mkdir(d, 0o750)
    assert stat.S_ISDIR(os.stat(m.source / "d").st_mode)
    assert errno_of(lambda: os.mkdir(d)) == errno.EEXIST
    (d / "f").touch()
    assert errno_of(lambda: os.rmdir(d)) == errno.ENOTEMPTY
    os.unlink(d / "f")
    os.rmdir(d)
    assert not (m.source / "d").exists()
    assert errno_of(lambda: os.rmdir(d)) == errno.ENOENT
    (m.mnt / "f").touch()
    assert errno_of(lambda: os.rmdir(m.mnt / "f")) == errno.ENOTDIR


# ---- files -----------------------------------------------------------------------------------
def test_create_excl(mounted):
    m = mounted()
    p = m.mnt / "f"
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    assert stat.S_IMODE(os.stat(m.source / "f").st_mode) == 0o600
    assert errno_of(lambda: os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY)) == errno.EEXIST


def test_open_read_write_flush_fsync_release(mounted):
    m = mounted()
    p = m.mnt / "f"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        assert os.write(fd, b"hello world") == 11
        assert os.pwrite(fd, b"W", 6) == 1
        os.fsync(fd)
        os.fdatasync(fd)
        assert os.pread(fd, 100, 0) == b"hello World"
        assert os.pread(fd, 5, 6) == b"World"
        assert os.pread(fd, 10, 100) == b""
        os.pwrite(fd, b"!", 20)  # a hole
    finally:
        os.close(fd)
    expected = b"hello World" + b"\0" * 9 + b"!"
    assert (m.source / "f").read_bytes() == expected
    assert p.read_bytes() == expected
    with open(p, "ab") as f:  # O_APPEND
        f.write(b"tail")
    assert (m.source / "f").read_bytes() == expected + b"tail"
    with open(p, "wb") as f:  # O_TRUNC
        f.write(b"new")
    assert (m.source / "f").read_bytes() == b"new"
    assert errno_of(lambda: os.open(m.mnt / "nope", os.O_RDONLY)) == errno.ENOENT


def test_large_file_round_trip(mounted):
    m = mounted()
    data = os.urandom(3 * 1024 * 1024 + 17)
    (m.mnt / "big").write_bytes(data)
    assert (m.source / "big").read_bytes() == data
    assert (m.mnt / "big").read_bytes() == data


def test_unlink(mounted):
    m = mounted()
    (m.mnt / "f").write_text("x")
    os.unlink(m.mnt / "f")
    assert not (m.source / "f").exists()
    assert errno_of(lambda: os.unlink(m.mnt / "f")) == errno.ENOENT
    (m.mnt / "d").mkdir()
    assert errno_of(lambda: os.unlink(m.mnt / "d")) == errno.EISDIR


def test_unlink_open_file_keeps_data(mounted):
    m = mounted()
    (m.mnt / "f").write_bytes(b"still here")
    with open(m.mnt / "f", "rb") as f:
        os.unlink(m.mnt / "f")
        assert f.read() == b"still here"
    assert os.listdir(m.mnt) == []


# ---- names -----------------------------------------------------------------------------------
def test_rename_replace_noreplace_exchange(mounted):
    m = mounted()
    (m.mnt / "a").write_text("A")
    (m.mnt / "b").write_text("B")
    (m.mnt / "d").mkdir()
    os.rename(m.mnt / "a", m.mnt / "d" / "a2")
    assert (m.source / "d" / "a2").read_text() == "A"
    assert sorted(os.listdir(m.mnt)) == ["b", "d"]
    os.rename(m.mnt / "d" / "a2", m.mnt / "b")  # replaces
    assert (m.mnt / "b").read_text() == "A"
    assert sorted(os.listdir(m.mnt)) == ["b", "d"]
    (m.mnt / "c").write_text("C")
    assert errno_of(lambda: renameat2(m.mnt / "c", m.mnt / "b", RENAME_NOREPLACE)) == errno.EEXIST
    assert (m.mnt / "b").read_text() == "A"
    renameat2(m.mnt / "c", m.mnt / "e", RENAME_NOREPLACE)
    assert (m.source / "e").read_text() == "C"
    renameat2(m.mnt / "e", m.mnt / "d", RENAME_EXCHANGE)
    assert (m.mnt / "d").read_text() == "C"
    assert stat.S_ISDIR(os.stat(m.mnt / "e").st_mode)
    assert (m.source / "d").read_text() == "C"
    (m.mnt / "x").mkdir()
    (m.mnt / "x" / "f").touch()
    assert errno_of(lambda: os.rename(m.mnt / "e", m.mnt / "x")) == errno.ENOTEMPTY
    assert errno_of(lambda: os.rename(m.mnt / "missing", m.mnt / "y")) == errno.ENOENT


def test_hard_link(mounted):
    m = mounted()
    (m.mnt / "f").write_text("data")
    os.link(m.mnt / "f", m.mnt / "g")
    assert os.stat(m.mnt / "f").st_nlink == 2
    assert os.stat(m.mnt / "g").st_nlink == 2
    assert os.stat(m.mnt / "f").st_ino == os.stat(m.mnt / "g").st_ino
    assert os.stat(m.source / "f").st_ino == os.stat(m.source / "g").st_ino
    (m.mnt / "g").write_text("changed")
    assert (m.mnt / "f").read_text() == "changed"
    os.unlink(m.mnt / "f")
    assert os.stat(m.mnt / "g").st_nlink == 1
    (m.mnt / "d").mkdir()
    assert errno_of(lambda: os.link(m.mnt / "d", m.mnt / "d2")) == errno.EPERM


def test_symlink_readlink(mounted):
    m = mounted()
    (m.mnt / "target").write_text("t")
    os.symlink("target", m.mnt / "l")
    assert os.readlink(m.mnt / "l") == "target"
    assert os.readlink(m.source / "l") == "target"
    assert stat.S_ISLNK(os.lstat(m.mnt / "l").st_mode)
    assert (m.mnt / "l").read_text() == "t"
    os.symlink("dangling/x" * 20, m.mnt / "long")
    assert os.readlink(m.mnt / "long") == "dangling/x" * 20
    assert errno_of(lambda: os.readlink(m.mnt / "target")) == errno.EINVAL


def test_statfs_matches_backing_volume(mounted):
    m = mounted()
    a, b = os.statvfs(m.mnt), os.statvfs(m.source)
    assert a.f_frsize == b.f_frsize
    assert a.f_blocks == b.f_blocks
    assert a.f_files == b.f_files
    assert a.f_namemax == 255
    assert abs(a.f_bavail - b.f_bavail) < b.f_blocks // 100 + 1000


def test_xattrs(mounted):
    m = mounted("--xattrs")
    p = m.mnt / "f"
    p.touch()
    os.setxattr(p, "user.color", b"blue")
    assert os.getxattr(p, "user.color") == b"blue"
    assert os.getxattr(m.source / "f", "user.color") == b"blue"
    assert "user.color" in os.listxattr(p)
    os.removexattr(p, "user.color")
    assert errno_of(lambda: os.getxattr(p, "user.color")) == errno.ENODATA
    os.setxattr(m.source / "f", "trusted.secret", b"root only")
    for name in ("trusted.secret", "trusted.other", "security.x"):
        assert errno_of(lambda name=name: os.setxattr(p, name, b"v")) == errno.EOPNOTSUPP
        assert errno_of(lambda name=name: os.getxattr(p, name)) == errno.ENODATA
    assert "trusted.secret" not in os.listxattr(p)
    assert os.getxattr(m.source / "f", "trusted.secret") == b"root only"


def test_mknod_fifo_allowed_devices_refused(mounted):
    m = mounted()
    os.mkfifo(m.mnt / "fifo", 0o600)
    assert stat.S_ISFIFO(os.lstat(m.mnt / "fifo").st_mode)
    assert stat.S_ISFIFO(os.lstat(m.source / "fifo").st_mode)
    for kind in (stat.S_IFCHR, stat.S_IFBLK):
        assert errno_of(lambda kind=kind: os.mknod(m.mnt / "dev", kind | 0o600,
                                                   os.makedev(1, 3))) == errno.EPERM
    assert not os.path.lexists(m.source / "dev")


def test_new_objects_belong_to_the_caller(mounted):
    m = mounted()
    shared = m.mnt / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)

    def work() -> None:
        with open("file", "w") as f:
            f.write("mine")
        os.mkdir("dir")
        os.symlink("file", "link")
        os.mkfifo("fifo")

    as_user(1000, 1000, work, cwd=shared)
    for name in ("file", "dir", "link", "fifo"):
        st = os.lstat(m.source / "shared" / name)
        assert (st.st_uid, st.st_gid) == (1000, 1000), name
        st = os.lstat(shared / name)
        assert (st.st_uid, st.st_gid) == (1000, 1000), name


def test_permissions_checked_by_kernel(mounted):
    m = mounted()
    (m.mnt / "private").write_text("secret")
    os.chmod(m.mnt / "private", 0o600)
    assert as_user(1000, 1000, lambda: errno_of(lambda: open("private").read()),
                   cwd=m.mnt) == errno.EACCES


# ---- read-only -------------------------------------------------------------------------------
def test_read_only_refuses_every_write(mounted, tmp_path):
    src = tmp_path / "rosrc"
    src.mkdir()
    (src / "f").write_text("content")
    (src / "d").mkdir()
    os.setxattr(src / "f", "user.a", b"1")
    m = mounted("--ro", "--xattrs", source=src)
    p = m.mnt / "f"
    assert p.read_text() == "content"
    assert os.getxattr(p, "user.a") == b"1"
    assert sorted(os.listdir(m.mnt)) == ["d", "f"]
    attempts = {
        "create": lambda: os.open(m.mnt / "new", os.O_CREAT | os.O_WRONLY),
        "open-write": lambda: os.open(p, os.O_WRONLY),
        "open-trunc": lambda: os.open(p, os.O_RDONLY | os.O_TRUNC),
        "mkdir": lambda: os.mkdir(m.mnt / "nd"),
        "rmdir": lambda: os.rmdir(m.mnt / "d"),
        "unlink": lambda: os.unlink(p),
        "rename": lambda: os.rename(p, m.mnt / "g"),
        "chmod": lambda: os.chmod(p, 0o777),
        "chown": lambda: os.chown(p, 1, 1),
        "utime": lambda: os.utime(p, (1, 1)),
        "truncate": lambda: os.truncate(p, 0),
        "setxattr": lambda: os.setxattr(p, "user.b", b"2"),
        "removexattr": lambda: os.removexattr(p, "user.a"),
        "symlink": lambda: os.symlink("f", m.mnt / "l"),
        "link": lambda: os.link(p, m.mnt / "h"),
        "mkfifo": lambda: os.mkfifo(m.mnt / "fifo"),
    }
    got = {name: errno_of(fn) for name, fn in attempts.items()}
    assert got == {name: errno.EROFS for name in attempts}
    assert (src / "f").read_text() == "content"
    assert sorted(set(os.listdir(src)) - {".azfs-meta"}) == ["d", "f"]


# ---- caching ---------------------------------------------------------------------------------
def test_changes_through_the_mount_are_seen_at_once(mounted):
    m = mounted("--cache-timeout", "30")
    p = m.mnt / "f"
    p.write_bytes(b"first version")
    assert p.read_bytes() == b"first version"
    assert os.stat(p).st_size == 13
    p.write_bytes(b"second")
    assert p.read_bytes() == b"second"
    os.truncate(p, 2)
    assert os.stat(p).st_size == 2
    assert p.read_bytes() == b"se"
    os.listdir(m.mnt)
    os.rename(p, m.mnt / "g")
    assert os.listdir(m.mnt) == ["g"]
    assert errno_of(lambda: os.stat(p)) == errno.ENOENT
    os.chmod(m.mnt / "g", 0o600)
    assert stat.S_IMODE(os.stat(m.mnt / "g").st_mode) == 0o600


def test_changes_in_the_source_are_seen_after_the_cache_timeout(mounted):
    m = mounted("--cache-timeout", "0.2")
    (m.source / "f").write_bytes(b"aaaa")
    assert (m.mnt / "f").read_bytes() == b"aaaa"
    assert os.listdir(m.mnt) == ["f"]
    (m.source / "f").write_bytes(b"bbbbbbbb")
    (m.source / "new").touch()
    os.chmod(m.source / "f", 0o600)
    wait_until(lambda: os.stat(m.mnt / "f").st_size == 8, timeout=10,
               what="the new size once the attribute cache expired")
    assert stat.S_IMODE(os.stat(m.mnt / "f").st_mode) == 0o600
    assert (m.mnt / "f").read_bytes() == b"bbbbbbbb"
    wait_until(lambda: sorted(os.listdir(m.mnt)) == ["f", "new"], timeout=10,
               what="the new entry in the listing")
    os.unlink(m.source / "new")
    wait_until(lambda: not (m.mnt / "new").exists(), timeout=10,
               what="the removed entry gone once the entry cache expired")


@pytest.mark.parametrize("count", [300])
def test_many_files_stat_and_forget(mounted, count):
    """Inodes come and go (lookup/forget) without leaking or confusing names."""
    m = mounted()
    for i in range(count):
        (m.mnt / f"f{i}").write_text(str(i))
    for i in range(count):
        assert (m.mnt / f"f{i}").read_text() == str(i)
    subprocess.run(["ls", "-l", str(m.mnt)], capture_output=True, check=True)
    for i in range(0, count, 2):
        os.unlink(m.mnt / f"f{i}")
    assert len(os.listdir(m.mnt)) == count // 2


def test_rewinddir_sees_the_current_directory(mounted):
    m = mounted()
    fd = os.open(m.mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.listdir(fd) == []
        (m.mnt / "f").touch()
        assert os.listdir(fd) == ["f"]  # listdir(fd) rewinds the stream first
    finally:
        os.close(fd)


def test_rename_whiteout_is_refused(mounted):
    m = mounted()
    (m.mnt / "a").touch()
    assert errno_of(lambda: renameat2(m.mnt / "a", m.mnt / "b", 4)) == errno.EINVAL
    assert sorted(os.listdir(m.source)) == [".azfs-meta", "a"]


def test_xattr_namespaces_other_than_user(mounted):
    m = mounted("--xattrs")
    p = m.mnt / "f"
    p.touch()
    os.setxattr(m.source / "f", "trusted.t", b"1")
    assert errno_of(lambda: os.removexattr(p, "trusted.t")) == errno.EOPNOTSUPP
    assert os.getxattr(m.source / "f", "trusted.t") == b"1"
    assert errno_of(lambda: os.getxattr(p, "system.posix_acl_access")) == errno.ENODATA
    assert errno_of(lambda: os.removexattr(p, "user.never-set")) == errno.ENODATA
    assert os.listxattr(p) == []


def test_chmod_of_a_symlink_itself(mounted):
    """fchmodat2(AT_SYMLINK_NOFOLLOW) reaches the filesystem: EOPNOTSUPP, target unchanged."""
    m = mounted()
    (m.mnt / "t").touch()
    os.chmod(m.mnt / "t", 0o644)
    os.symlink("t", m.mnt / "l")
    at_fdcwd, at_symlink_nofollow, sys_fchmodat2 = -100, 0x100, 452
    rc = _libc.syscall(sys_fchmodat2, at_fdcwd, os.fsencode(m.mnt / "l"), 0o600,
                       at_symlink_nofollow)
    err = ctypes.get_errno() if rc != 0 else 0
    if err == errno.ENOSYS:
        pytest.skip("kernel without fchmodat2")
    assert err == errno.EOPNOTSUPP
    assert stat.S_IMODE(os.stat(m.source / "t").st_mode) == 0o644


def test_unix_socket_node(mounted):
    import socket

    m = mounted()
    with socket.socket(socket.AF_UNIX) as s:
        os.chdir(m.mnt)  # keep the path short
        try:
            s.bind("sock")
        finally:
            os.chdir("/")
    assert stat.S_ISSOCK(os.lstat(m.source / "sock").st_mode)
    assert stat.S_ISSOCK(os.lstat(m.mnt / "sock").st_mode)


def test_o_direct_is_served(mounted):
    m = mounted()
    fd = os.open(m.mnt / "f", os.O_CREAT | os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.write(fd, b"unaligned bytes") == 15
    finally:
        os.close(fd)
    fd = os.open(m.mnt / "f", os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.read(fd, 4096) == b"unaligned bytes"
    finally:
        os.close(fd)
    assert (m.source / "f").read_bytes() == b"unaligned bytes"


def test_more_inodes_than_descriptors(mounted):
    # without CAP_SYS_RESOURCE the daemon cannot raise its limit back up
    m = mounted(prefix=["setpriv", "--bounding-set", "-sys_resource",
                        "prlimit", "--nofile=400:400", "--"])
    for i in range(1000):
        (m.source / f"f{i:04d}").touch()
    out = subprocess.run(["ls", "-l", str(m.mnt)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr.splitlines()[:3]
    assert len(os.listdir(m.mnt)) == 1000
    for i in range(0, 1000, 7):
        assert os.stat(m.mnt / f"f{i:04d}").st_size == 0


def test_utimens_omit_and_now(mounted):
    """touch -a / -m change one time and leave the other (UTIME_OMIT)."""
    m = mounted()
    p = m.mnt / "f"
    p.touch()
    os.utime(p, ns=(10**18, 2 * 10**18))
    subprocess.run(["touch", "-m", "-d", "@1500000000", str(p)], check=True)
    st = os.stat(m.source / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (10**18, 1_500_000_000 * 10**9)
    subprocess.run(["touch", "-a", str(p)], check=True)  # atime = now
    st = os.stat(m.source / "f")
    assert st.st_mtime_ns == 1_500_000_000 * 10**9
    assert abs(st.st_atime_ns - time.time_ns()) < 60 * 10**9


def test_shared_mmap_writes_reach_the_source(mounted):
    import mmap

    m = mounted()
    p = m.mnt / "f"
    p.write_bytes(b"\0" * 8192)
    with open(p, "r+b") as f, mmap.mmap(f.fileno(), 8192) as mm:
        mm[100:105] = b"hello"
        mm.flush()
    assert (m.source / "f").read_bytes()[100:105] == b"hello"
    assert p.read_bytes()[100:105] == b"hello"


def test_parallel_writers_and_readers(mounted):
    """Many threads at once: every file ends up with exactly what its writer wrote."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    m = mounted()

    def worker(n: int) -> None:
        rng = random.Random(n)
        d = m.mnt / f"w{n}"
        d.mkdir()
        for i in range(40):
            data = rng.randbytes(rng.choice([0, 1, 4095, 4096, 70_000, 300_000]))
            (d / f"f{i}").write_bytes(data)
            assert (d / f"f{i}").read_bytes() == data
            if i % 3 == 0:
                os.rename(d / f"f{i}", d / f"r{i}")
            os.listdir(m.mnt)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, range(8)))
    for n in range(8):
        rng = random.Random(n)
        for i in range(40):
            data = rng.randbytes(rng.choice([0, 1, 4095, 4096, 70_000, 300_000]))
            name = f"r{i}" if i % 3 == 0 else f"f{i}"
            assert (m.source / f"w{n}" / name).read_bytes() == data


#: a daemon that may hold only a few dozen node descriptors (evicted ones are reopened)
TIGHT_DESCRIPTORS = ["setpriv", "--bounding-set", "-sys_resource",
                     "prlimit", "--nofile=300:300", "--"]


def _evict_descriptors(m) -> None:
    (m.source / "many").mkdir(exist_ok=True)
    for i in range(400):
        (m.source / "many" / f"f{i}").touch()
    for name in os.listdir(m.mnt / "many"):
        os.stat(m.mnt / "many" / name)


@pytest.mark.parametrize("change", ["rename", "unlink-other-link"])
def test_evicted_node_follows_changes_made_in_the_source(mounted, change):
    """Another node (or the host) renames a file this daemon knows but holds no
    descriptor for: after the cache timeout the file is reachable by its new name."""
    m = mounted("--cache-timeout", "0.2", prefix=TIGHT_DESCRIPTORS)
    (m.mnt / "a").write_text("data")
    if change == "unlink-other-link":
        os.link(m.mnt / "a", m.mnt / "b")
    pin = os.open(m.mnt / "a", os.O_RDONLY)  # the kernel keeps the inode
    try:
        _evict_descriptors(m)
        if change == "rename":
            os.rename(m.source / "a", m.source / "b")
        else:
            os.unlink(m.source / "a")

        def read_b() -> str | None:
            try:
                return (m.mnt / "b").read_text()
            except OSError:
                return None  # until the kernel's cached entry expires

        wait_until(lambda: read_b() == "data", timeout=10,
                   what="the file under its new name after the cache timeout")
    finally:
        os.close(pin)


def test_evicted_hard_link_survives_unlink_of_its_first_name(mounted):
    m = mounted(prefix=TIGHT_DESCRIPTORS)
    (m.mnt / "a").write_text("data")
    os.link(m.mnt / "a", m.mnt / "b")
    _evict_descriptors(m)
    os.unlink(m.mnt / "a")
    assert (m.mnt / "b").read_text() == "data"
    (m.mnt / "b").write_text("more")
    assert (m.source / "b").read_text() == "more"


def test_evicted_open_file_survives_its_unlink(mounted):
    m = mounted("--cache-timeout", "0.2", prefix=TIGHT_DESCRIPTORS)
    (m.mnt / "f").write_text("data")
    fd = os.open(m.mnt / "f", os.O_RDWR)
    try:
        _evict_descriptors(m)
        os.unlink(m.mnt / "f")
        # past the attribute cache the kernel asks the daemon again
        wait_until(lambda: os.fstat(fd).st_nlink == 0, timeout=10,
                   what="the link count of the unlinked file")
        assert os.pread(fd, 10, 0) == b"data"
    finally:
        os.close(fd)


def test_open_with_o_nofollow(mounted):
    """O_NOFOLLOW refuses a symlink as the last component, and only that."""
    m = mounted()
    (m.mnt / "f").write_text("data")
    os.symlink("f", m.mnt / "l")
    fd = os.open(m.mnt / "f", os.O_RDONLY | os.O_NOFOLLOW)
    try:
        assert os.read(fd, 10) == b"data"
    finally:
        os.close(fd)
    fd = os.open(m.mnt / "f", os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    os.write(fd, b"!")
    os.close(fd)
    assert (m.source / "f").read_text() == "data!"
    assert errno_of(lambda: os.open(m.mnt / "l", os.O_RDONLY | os.O_NOFOLLOW)) == errno.ELOOP


def test_statfs_of_a_hung_volume_fails_instead_of_hanging(mounted, tmp_path):
    """The volume is itself a FUSE mount whose daemon is stopped (a dead SMB server).

    SEMANTICS, Concurrency: a call past its deadline fails with ETIMEDOUT.
    """
    import signal

    volume = mounted()
    (volume.mnt / "vfolder").mkdir()
    m = mounted("--metadata-deadline", "3", source=volume.mnt / "vfolder")
    (m.mnt / "f").write_text("x")  # the ledger has something to persist
    assert os.statvfs(m.mnt).f_bsize > 0
    result: list[int] = []
    pid = volume.pids[0]
    os.kill(pid, signal.SIGSTOP)
    try:
        # the pending change's flush (due within a second) gets stuck on the volume
        wait_until(lambda: _blocked_in_fuse(m.pids), timeout=10,
                   what="the daemon's ledger flush waiting on the stopped volume")
        t = threading.Thread(target=lambda: result.append(errno_of(lambda: os.statvfs(m.mnt))),
                             daemon=True)
        t.start()
        t.join(15)  # the metadata deadline is 3 s
    finally:
        os.kill(pid, signal.SIGCONT)  # always: a stopped volume would hang the teardown
    t.join(30)
    assert result == [errno.ETIMEDOUT]


def _blocked_in_fuse(pids: list[int]) -> bool:
    """True when a thread of ``pids`` waits in the kernel for a FUSE daemon's answer."""
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                wchan = (task / "wchan").read_text()
            except OSError:
                continue
            if wchan == "request_wait_answer":  # fs/fuse/dev.c
                return True
    return False


def test_new_objects_get_exactly_the_mode_asked_for_whatever_the_name(mounted):
    """SEMANTICS, create: the mode is ``mode & ~umask`` of the caller, never also the daemon's."""
    m = mounted()
    old = os.umask(0)
    try:
        for name in ("short", "n" * 255):
            p = m.mnt / name
            os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o622))
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o622, name
            os.unlink(p)
            os.mkdir(p, 0o772)
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o772, name
            os.rmdir(p)
            os.mkfifo(p, 0o606)
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o606, name
            os.unlink(p)
    finally:
        os.umask(old)


def test_a_write_by_a_non_owner_clears_the_set_id_bits(mounted):
    """SEMANTICS, write: as on ext4, a write by another user (with write permission)
    succeeds and clears the file's set-user-id and set-group-id bits."""
    m = mounted("--uid", "1000", "--gid", "1000")
    (m.mnt / "f").write_text("data")
    os.chmod(m.mnt / "f", 0o6776)

    def append() -> None:
        with open("f", "a") as f:  # relative: the test's temp root is not traversable
            f.write("more")

    as_user(1001, 1001, append, cwd=m.mnt)
    assert stat.S_IMODE(os.stat(m.source / "f").st_mode) == 0o776
    assert (m.source / "f").read_text() == "datamore"


def test_renames_in_a_sticky_directory_follow_the_sticky_rules(mounted):
    """SEMANTICS, rename: in a sticky directory a user renames, or replaces, only
    entries they own (or in a directory they own), as on ext4."""
    m = mounted()
    t = m.mnt / "t"
    t.mkdir()
    os.chmod(t, 0o1777)
    (t / "roots").write_text("root's")

    def own_then_others() -> list[int]:
        with open("mine", "w") as f:
            f.write("mine")
        return [errno_of(lambda: os.rename("mine", "mine2")),   # own entry: allowed
                errno_of(lambda: os.rename("roots", "r2")),     # another's: EPERM
                errno_of(lambda: os.rename("mine2", "roots"))]  # replacing another's: EPERM

    assert as_user(1000, 1000, own_then_others, cwd=t) == [0, errno.EPERM, errno.EPERM]
    assert sorted(os.listdir(m.source / "t")) == ["mine2", "roots"]
    assert (m.source / "t" / "roots").read_text() == "root's"


def test_without_xattrs_the_kernel_answers_and_stops_asking(mounted):
    """Off by default: no request per write() for security.capability, none for ls -l."""
    m = mounted()
    p = m.mnt / "f"
    with open(p, "wb") as f:
        for _ in range(50):
            f.write(b"x" * 4096)
    assert p.stat().st_size == 50 * 4096
    assert errno_of(lambda: os.getxattr(p, "user.k")) == errno.EOPNOTSUPP
    assert errno_of(lambda: os.setxattr(p, "user.k", b"v")) == errno.EOPNOTSUPP
    assert errno_of(lambda: os.listxattr(p)) == errno.EOPNOTSUPP
    os.setxattr(m.source / "f", "user.k", b"on the volume")  # present, but not served
    assert errno_of(lambda: os.getxattr(p, "user.k")) == errno.EOPNOTSUPP
