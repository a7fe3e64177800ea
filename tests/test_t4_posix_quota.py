"""Byte and file quotas of a posix vfolder, through a real mount.

A refused write must leave the file exactly as it was (content and size), and
``statfs`` shows the quota as the size of the filesystem.
"""

from __future__ import annotations

import errno
import os
import stat

from tests.support.fuse import errno_of

K = 1024


def write_at(path, data: bytes, offset: int) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        return os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def test_byte_quota_refuses_growth_and_keeps_content(mounted):
    m = mounted("--quota-bytes", "100K")
    p = m.mnt / "f"
    first = os.urandom(60 * K)
    assert write_at(p, first, 0) == 60 * K
    assert errno_of(lambda: write_at(p, os.urandom(60 * K), 60 * K)) == errno.EDQUOT
    assert os.stat(p).st_size == 60 * K
    assert (m.source / "f").read_bytes() == first
    assert p.read_bytes() == first
    # overwriting inside the file needs no quota, and works at the limit
    write_at(p, b"x" * 40 * K, 60 * K)  # 100K exactly
    write_at(p, b"y" * 10 * K, 0)
    assert (m.source / "f").read_bytes() == b"y" * 10 * K + first[10 * K:] + b"x" * 40 * K
    assert errno_of(lambda: write_at(p, b"z", 100 * K)) == errno.EDQUOT
    assert errno_of(lambda: write_at(m.mnt / "g", b"z", 0)) == errno.EDQUOT
    assert os.stat(m.mnt / "g").st_size == 0  # created, but nothing written
    assert os.stat(p).st_size == 100 * K


def test_byte_quota_large_single_write(mounted):
    m = mounted("--quota-bytes", "100K")
    p = m.mnt / "f"
    (m.mnt / "keep").write_bytes(b"k" * 10 * K)
    assert errno_of(lambda: write_at(p, os.urandom(400 * K), 0)) == errno.EDQUOT
    assert os.stat(m.source / "f").st_size == 0
    assert (m.mnt / "keep").read_bytes() == b"k" * 10 * K


def test_byte_quota_unaligned_write_may_be_short(mounted):
    """The kernel splits a write at page boundaries when it starts mid-page, and each
    piece is checked on its own: the first piece may land (a short write), the rest is
    refused.  Whatever happens, every byte reported written is there, no byte more,
    and what was in the file before is intact."""
    m = mounted("--quota-bytes", "100K")
    p = m.mnt / "f"
    p.write_bytes(b"a" * 50 * K + b"a" * 100)
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        try:
            n = os.write(fd, b"b" * 80 * K)
        except OSError as exc:
            assert exc.errno == errno.EDQUOT
            n = 0
        assert n < 50 * K - 100
        assert errno_of(lambda: os.write(fd, b"b" * 80 * K)) == errno.EDQUOT
    finally:
        os.close(fd)
    assert (m.source / "f").read_bytes() == b"a" * (50 * K + 100) + b"b" * n


def test_truncate_grow_beyond_quota(mounted):
    m = mounted("--quota-bytes", "100K")
    p = m.mnt / "f"
    p.write_bytes(b"a" * 10 * K)
    assert errno_of(lambda: os.truncate(p, 200 * K)) == errno.EDQUOT
    assert os.stat(p).st_size == 10 * K
    os.truncate(p, 100 * K)  # exactly at the quota
    assert errno_of(lambda: os.truncate(m.mnt / "f", 100 * K + 1)) == errno.EDQUOT
    fd = os.open(p, os.O_RDWR)
    try:
        assert errno_of(lambda: os.ftruncate(fd, 101 * K)) == errno.EDQUOT
        os.ftruncate(fd, 5)
    finally:
        os.close(fd)
    assert p.read_bytes() == b"aaaaa"
    os.truncate(p, 100 * K)


def test_deleting_and_shrinking_free_quota(mounted):
    m = mounted("--quota-bytes", "100K")
    (m.mnt / "a").write_bytes(b"a" * 80 * K)
    assert errno_of(lambda: write_at(m.mnt / "b", b"b" * 40 * K, 0)) == errno.EDQUOT
    os.unlink(m.mnt / "a")
    write_at(m.mnt / "b", b"b" * 90 * K, 0)
    os.truncate(m.mnt / "b", 10 * K)
    write_at(m.mnt / "c", b"c" * 90 * K, 0)
    (m.mnt / "d").mkdir()
    os.rename(m.mnt / "c", m.mnt / "d" / "c")
    os.rename(m.mnt / "b", m.mnt / "d" / "c")  # replacing frees the 90K of the old c
    write_at(m.mnt / "e", b"e" * 90 * K, 0)


def test_hard_links_count_once(mounted):
    m = mounted("--quota-bytes", "100K")
    (m.mnt / "f").write_bytes(b"f" * 60 * K)
    os.link(m.mnt / "f", m.mnt / "g")
    os.link(m.mnt / "f", m.mnt / "h")
    write_at(m.mnt / "other", b"o" * 30 * K, 0)  # 90K used if links count once
    os.unlink(m.mnt / "f")
    os.unlink(m.mnt / "g")  # the inode lives on as h: nothing freed
    assert errno_of(lambda: write_at(m.mnt / "more", b"m" * 20 * K, 0)) == errno.EDQUOT
    os.unlink(m.mnt / "h")
    write_at(m.mnt / "more", b"m" * 60 * K, 0)


def test_file_quota(mounted):
    m = mounted("--quota-files", "4")
    (m.mnt / "f").touch()
    (m.mnt / "d").mkdir()
    os.symlink("f", m.mnt / "l")
    os.mkfifo(m.mnt / "p")
    refused = {
        "create": lambda: os.open(m.mnt / "x", os.O_CREAT | os.O_WRONLY),
        "mkdir": lambda: os.mkdir(m.mnt / "x"),
        "symlink": lambda: os.symlink("f", m.mnt / "x"),
        "mknod": lambda: os.mkfifo(m.mnt / "x"),
        "create-in-subdir": lambda: os.open(m.mnt / "d" / "x", os.O_CREAT | os.O_WRONLY),
    }
    assert {k: errno_of(f) for k, f in refused.items()} == {k: errno.EDQUOT for k in refused}
    assert not os.path.lexists(m.source / "x")
    os.link(m.mnt / "f", m.mnt / "hard")  # a name, not a new file
    assert os.stat(m.mnt / "hard").st_nlink == 2
    os.rename(m.mnt / "hard", m.mnt / "d" / "hard")
    os.unlink(m.mnt / "f")  # still linked as d/hard: no file freed
    assert errno_of(refused["create"]) == errno.EDQUOT
    os.unlink(m.mnt / "p")
    fd = os.open(m.mnt / "x", os.O_CREAT | os.O_WRONLY)
    os.close(fd)
    # opening an existing file with O_CREAT is not a new file
    os.close(os.open(m.mnt / "x", os.O_CREAT | os.O_WRONLY))


def test_statfs_reports_quota(mounted):
    m = mounted("--quota-bytes", "64M", "--quota-files", "1000")
    st = os.statvfs(m.mnt)
    assert st.f_blocks * st.f_frsize == 64 * 1024 * K
    assert st.f_files == 1000
    free_before, ffree_before = st.f_bfree, st.f_ffree
    (m.mnt / "d").mkdir()
    (m.mnt / "d" / "f").write_bytes(b"x" * 4 * 1024 * K)
    st = os.statvfs(m.mnt)
    assert (free_before - st.f_bfree) * st.f_frsize == 4 * 1024 * K
    assert st.f_bavail == st.f_bfree
    assert ffree_before - st.f_ffree == 2
    result = os.statvfs(m.mnt / "d")  # any path inside reports the same
    assert result.f_blocks == st.f_blocks


def test_quota_does_not_affect_reads_or_chmod(mounted):
    m = mounted("--quota-bytes", "10K", "--quota-files", "1", "--xattrs")
    (m.mnt / "f").write_bytes(b"a" * 10 * K)
    os.chmod(m.mnt / "f", 0o600)
    assert stat.S_IMODE(os.stat(m.mnt / "f").st_mode) == 0o600
    assert (m.mnt / "f").read_bytes() == b"a" * 10 * K
    os.setxattr(m.mnt / "f", "user.k", b"v")


def test_create_of_a_name_that_exists_is_no_new_file_at_a_full_quota(mounted):
    """SEMANTICS, Quotas: ``create`` of a name that exists already is not a new file."""
    m = mounted("--quota-files", "1", "--cache-timeout", "30")
    (m.mnt / "f").touch()  # the file quota is full
    assert not os.path.exists(m.mnt / "g")  # the kernel remembers the name as missing
    (m.source / "g").write_text("made on the volume")
    # the kernel, sure the name is new, asks azfs to create it; azfs finds it
    fd = os.open(m.mnt / "g", os.O_CREAT | os.O_WRONLY)
    os.close(fd)
    assert (m.source / "g").read_text() == "made on the volume"
    assert errno_of(lambda: os.open(m.mnt / "h", os.O_CREAT | os.O_WRONLY)) == errno.EDQUOT
