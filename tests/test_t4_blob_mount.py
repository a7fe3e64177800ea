"""Blob datasets through a real FUSE mount (``azfs mount URL MNT`` in a subprocess).

Every mount is lazily unmounted (``fusermount3 -u -z``) and its daemon ended
at teardown, whatever the test did.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import random
from pathlib import Path

import pytest

from azfs.blob.sas import sas_expiry
from tests.support.azurite import azurite  # noqa: F401
from tests.support.fuse import Mount, cleanup, errno_of
from tests.support.poll import wait_until

KiB = 1024
MiB = 1024 * KiB
RNG = random.Random(4321)
BIG = RNG.randbytes(6 * MiB + 321)
SMALL = b"small blob\n"


@pytest.fixture(scope="module")
def dataset(azurite):  # noqa: F811
    azurite.upload("mounted", {"big.bin": BIG, "dir/small.txt": SMALL, "dir/sub/": b"",
                               "replace.bin": BIG})
    return azurite


@pytest.fixture
def blob_mount(dataset, tmp_path):
    """Factory: mounts container ``mounted`` with a SAS file; returns (Mount, sas_file)."""
    mounts: list[Mount] = []
    env = dict(os.environ, AZFS_RUN_DIR=str(tmp_path / "run"))

    def factory(*options: str, sas: str | None = None) -> tuple[Mount, Path]:
        n = len(mounts)
        sas_file = tmp_path / f"sas{n}"
        sas_file.write_text(sas or dataset.container_sas("mounted"))
        mnt = tmp_path / f"mnt{n}"
        mnt.mkdir()
        url = dataset.container_url("mounted")
        m = Mount(url, mnt, ["--sas-file", str(sas_file), *options],  # type: ignore[arg-type]
                  tmp_path / f"azfs{n}.log", env)
        mounts.append(m)
        m.mount()
        return m, sas_file

    yield factory
    for m in reversed(mounts):
        cleanup(m)


def test_tree_and_byte_exact_reads(blob_mount, tmp_path):
    cache = tmp_path / "cache"
    m, _ = blob_mount("--cache-dir", str(cache), "--cache-bytes", "64M")
    mnt = m.mnt
    assert sorted(os.listdir(mnt)) == ["big.bin", "dir", "replace.bin"]
    assert sorted(os.listdir(mnt / "dir")) == ["small.txt", "sub"]
    assert (mnt / "dir" / "sub").is_dir()
    st = os.stat(mnt / "big.bin")
    assert st.st_size == len(BIG) and st.st_mode & 0o777 == 0o444
    assert (mnt / "dir" / "small.txt").read_bytes() == SMALL
    assert (mnt / "big.bin").read_bytes() == BIG
    fd = os.open(mnt / "big.bin", os.O_RDONLY)
    try:
        for _ in range(50):
            off = RNG.randrange(0, len(BIG))
            size = RNG.choice([1, 4 * KiB, 100_000, MiB])
            assert os.pread(fd, size, off) == BIG[off:off + size]
    finally:
        os.close(fd)
    # blocks reach the disk cache in the background: poll, do not sleep
    wait_until(lambda: any(p.is_file() for p in (cache / "blocks-v2").rglob("*")),
               timeout=30, what="a block in the disk cache")
    # the SAS never shows in the mount table or the daemon's command line
    with open("/proc/self/mountinfo") as f:
        assert "sig=" not in f.read()
    for pid in m.pids:
        assert b"sig=" not in Path(f"/proc/{pid}/cmdline").read_bytes()


def test_writes_fail_with_erofs(blob_mount):
    m, _ = blob_mount()
    mnt = m.mnt
    assert errno_of(lambda: os.open(mnt / "big.bin", os.O_WRONLY)) == errno.EROFS
    assert errno_of(lambda: os.open(mnt / "new", os.O_WRONLY | os.O_CREAT, 0o644)) \
        == errno.EROFS
    assert errno_of(lambda: os.mkdir(mnt / "newdir")) == errno.EROFS
    assert errno_of(lambda: os.unlink(mnt / "big.bin")) == errno.EROFS
    assert errno_of(lambda: os.rename(mnt / "big.bin", mnt / "moved")) == errno.EROFS
    assert errno_of(lambda: os.truncate(mnt / "big.bin", 0)) == errno.EROFS
    assert errno_of(lambda: os.rmdir(mnt / "dir" / "sub")) == errno.EROFS
    # extended attributes are off unless --xattrs: the kernel answers for them
    assert errno_of(lambda: os.setxattr(mnt / "big.bin", "user.x", b"1")) == errno.EOPNOTSUPP
    assert (mnt / "big.bin").stat().st_size == len(BIG)


def test_replaced_blob_gives_estale_never_mixed_bytes(blob_mount, dataset):
    m, _ = blob_mount()
    fd = os.open(m.mnt / "replace.bin", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel read-ahead
        assert os.pread(fd, 4 * KiB, MiB) == BIG[MiB:MiB + 4 * KiB]
        dataset.upload("mounted", {"replace.bin": bytes(reversed(BIG))})
        # the stale-object error of SEMANTICS.md (StaleObject → ESTALE), not a plain EIO
        err = errno_of(lambda: os.pread(fd, 4 * KiB, 4 * MiB))
        assert err == errno.ESTALE, os.strerror(err) if err else "the read succeeded"
    finally:
        os.close(fd)
    # a new open sees the new version (after the listing TTL or a fresh lookup)
    fd = os.open(m.mnt / "replace.bin", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        new = bytes(reversed(BIG))
        assert os.pread(fd, 4 * KiB, 4 * MiB) == new[4 * MiB:4 * MiB + 4 * KiB]
    finally:
        os.close(fd)
        dataset.upload("mounted", {"replace.bin": BIG})


def test_expired_sas_gives_eacces_until_the_sas_file_is_renewed(blob_mount, dataset):
    m, sas_file = blob_mount(sas=dataset.container_sas("mounted", seconds=3))
    fd = os.open(m.mnt / "big.bin", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        assert os.pread(fd, 4 * KiB, 0) == BIG[:4 * KiB]
        expiry = sas_expiry(sas_file.read_text())
        wait_until(lambda: dt.datetime.now(dt.UTC) > expiry, timeout=30,
                   what="the SAS's expiry")
        assert errno_of(lambda: os.pread(fd, 4 * KiB, 2 * MiB)) == errno.EACCES
        assert "expired" in m.log_text()
        sas_file.write_text(dataset.container_sas("mounted"))
        assert os.pread(fd, 4 * KiB, 2 * MiB) == BIG[2 * MiB:2 * MiB + 4 * KiB]
    finally:
        os.close(fd)
    assert "sig=" not in m.log_text().replace("sig=***", "")


def test_bad_sources_fail_the_mount_clearly(dataset, tmp_path):
    from tests.support.fuse import azfs
    env = dict(os.environ, AZFS_RUN_DIR=str(tmp_path / "run"))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    forged = dataset.container_sas("mounted").split("sig=")[0] + "sig=" + "A" * 43 + "%3D"
    (tmp_path / "forged").write_text(forged)
    cases = [
        ([dataset.container_url("mounted"), str(mnt)], "SAS"),
        (["--sas-file", str(tmp_path / "forged"), dataset.container_url("mounted"),
          str(mnt)], "refused"),
        (["--sas-file", str(tmp_path / "missing"), dataset.container_url("mounted"),
          str(mnt)], "missing"),
        (["http://127.0.0.1:1/devstoreaccount1/BAD", str(mnt)], "container"),
    ]
    for args, needle in cases:
        res = azfs("mount", "--log-file", str(tmp_path / "log"), *args, env=env, timeout=120)
        assert res.returncode != 0
        # errors of the daemon's start-up reach the command's stderr, as one line
        log = (tmp_path / "log").read_text() if (tmp_path / "log").exists() else ""
        assert needle in res.stderr, res.stderr + log
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "Traceback" not in res.stderr + log and "AAAA" not in res.stderr + log
        assert not os.path.ismount(mnt)


def test_sas_in_the_url_stays_off_the_daemons_command_line(dataset, tmp_path):
    """``azfs mount URL?SAS``: the background daemon gets the SAS through a pipe."""
    env = dict(os.environ, AZFS_RUN_DIR=str(tmp_path / "run"))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    url = dataset.container_url("mounted") + "?" + dataset.container_sas("mounted")
    m = Mount(url, mnt, [], tmp_path / "azfs.log", env)  # type: ignore[arg-type]
    try:
        m.mount()
        assert (mnt / "dir" / "small.txt").read_bytes() == SMALL
        assert m.pids
        for pid in m.pids:
            assert b"sig=" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    finally:
        cleanup(m)
