"""Blob datasets as training loops read them: many small files through a real ``azfs mount``.

Real Azurite, real FUSE mounts (``azfs mount`` in a subprocess), counters read
from the mount's control socket (``azfs dataset stats``).  Every mount is
lazily unmounted and its daemon ended at teardown, whatever the test did.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.support.azurite import azurite  # noqa: F401
from tests.support.fuse import Mount, cleanup, errno_of
from tests.support.poll import wait_until

REPO = Path(__file__).resolve().parents[1]
KiB = 1024
RNG = random.Random(99)
#: 240 files of 0-300 KiB in 12 class folders, all below the whole-fetch limit (1 MiB)
FILES = {f"train/c{i % 12:02d}/img{i:04d}.jpg": RNG.randbytes(RNG.choice([0, 1, 4 * KiB,
                                                                           100 * KiB,
                                                                           300 * KiB]))
         for i in range(240)}
SAME_SIZE = 64 * KiB


@pytest.fixture(scope="module")
def dataset(azurite):  # noqa: F811
    azurite.upload("small", {**FILES, "swap/v.bin": b"1" * SAME_SIZE})
    return azurite


@pytest.fixture
def mount(dataset, tmp_path):
    """Factory: mounts container ``small``; returns the Mount."""
    mounts: list[Mount] = []
    env = dict(os.environ, AZFS_RUN_DIR=str(tmp_path / "run"))

    def factory(*options: str) -> Mount:
        n = len(mounts)
        sas_file = tmp_path / f"sas{n}"
        sas_file.write_text(dataset.container_sas("small"))
        mnt = tmp_path / f"mnt{n}"
        mnt.mkdir()
        m = Mount(dataset.container_url("small"), mnt,  # type: ignore[arg-type]
                  ["--sas-file", str(sas_file), *options], tmp_path / f"azfs{n}.log", env)
        mounts.append(m)
        m.mount()
        return m

    yield factory
    for m in reversed(mounts):
        cleanup(m)


def dataset_cli(m: Mount, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "azfs.cli.main", "dataset", *args,
                           str(m.mnt)], capture_output=True, text=True, cwd=REPO,
                          env=m.env, timeout=60)


def stats(m: Mount) -> dict:
    res = dataset_cli(m, "stats")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def read_concurrently(root: Path, readers: int = 16) -> dict[str, bytes]:
    """Every file under ``root`` read by ``readers`` threads at once (name → bytes)."""
    paths = sorted(str(Path(d, f).relative_to(root)) for d, _, fs in os.walk(root) for f in fs)
    out: dict[str, bytes] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    it = iter(paths)

    def worker() -> None:
        try:
            while True:
                with lock:
                    name = next(it, None)
                if name is None:
                    return
                data = (root / name).read_bytes()
                with lock:
                    out[name] = data
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(readers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
    return out


def test_many_small_files_read_by_concurrent_readers_are_byte_exact(mount, tmp_path):
    cache = tmp_path / "cache"
    m = mount("--cache-dir", str(cache), "--cache-bytes", "256M")
    got = read_concurrently(m.mnt / "train")
    assert got.keys() == {k[len("train/"):] for k in FILES}
    bad = [k for k, v in FILES.items() if got[k[len("train/"):]] != v]
    assert not bad, f"{len(bad)} files differ, e.g. {bad[0]}"
    s = stats(m)
    # sizes and ETags come from the listing: no HEAD per file; one GET per non-empty file
    assert s["http.heads"] == 0
    nonempty = sum(1 for v in FILES.values() if v)
    assert s["http.data_gets"] == nonempty
    assert s["read.whole_fetches"] == nonempty
    # every small blob reaches the block cache (written in the background: poll)
    wait_until(lambda: stats(m)["cache.entries"] >= nonempty, timeout=30,
               what="every small blob in the block cache")
    cleanup(m)
    # a new daemon on the same cache (another kernel of the node): no data GET at all
    again = mount("--cache-dir", str(cache), "--cache-bytes", "256M")
    got = read_concurrently(again.mnt / "train")
    assert all(got[k[len("train/"):]] == v for k, v in FILES.items())
    s = stats(again)
    assert s["http.data_gets"] == 0 and s["http.heads"] == 0
    assert s["read.cache_hits"] == nonempty


def test_blob_replaced_between_listing_and_open_gives_estale(mount, dataset):
    m = mount()
    assert os.listdir(m.mnt / "swap") == ["v.bin"]  # listed: size and ETag now cached
    dataset.upload("small", {"swap/v.bin": b"2" * SAME_SIZE})
    try:
        # the open is pinned to the listed version: the first GET fails its If-Match
        fd = os.open(m.mnt / "swap" / "v.bin", os.O_RDONLY)
        try:
            err = errno_of(lambda: os.pread(fd, SAME_SIZE, 0))
            assert err == errno.ESTALE, os.strerror(err) if err else "the read succeeded"
        finally:
            os.close(fd)
        # the stale listing is dropped: the next open reads the new version, whole
        assert (m.mnt / "swap" / "v.bin").read_bytes() == b"2" * SAME_SIZE
    finally:
        dataset.upload("small", {"swap/v.bin": b"1" * SAME_SIZE})


def test_refresh_makes_a_new_blob_visible(mount, dataset):
    m = mount()  # default listing TTL: a minute
    c00 = m.mnt / "train" / "c00"
    assert "late.bin" not in os.listdir(c00)
    # what the kernel holds for the TTL: a negative entry, a file's size and its pages
    assert errno_of(lambda: os.stat(c00 / "probe.bin")) == errno.ENOENT
    grown = sorted(os.listdir(c00))[0]
    old = (c00 / grown).read_bytes()
    dataset.upload("small", {"train/c00/late.bin": b"late", "train/c00/probe.bin": b"probe",
                             f"train/c00/{grown}": b"new " + old})
    try:
        assert "late.bin" not in os.listdir(c00)  # the cached listing
        assert errno_of(lambda: os.stat(c00 / "probe.bin")) == errno.ENOENT
        res = dataset_cli(m, "refresh")
        assert res.returncode == 0, res.stderr
        # once refresh returns, neither the daemon nor the kernel serves the old state
        assert "late.bin" in os.listdir(c00)
        assert (c00 / "late.bin").read_bytes() == b"late"
        assert (c00 / "probe.bin").read_bytes() == b"probe"
        assert os.stat(c00 / grown).st_size == len(old) + 4
        assert (c00 / grown).read_bytes() == b"new " + old
        assert stats(m)["refreshes"] == 1
    finally:
        dataset.upload("small", {f"train/c00/{grown}": old})
        for name in ("late.bin", "probe.bin"):
            dataset.service_client().get_container_client("small").delete_blob(
                f"train/c00/{name}")


def test_refresh_of_a_path_and_bad_refresh_requests(mount, tmp_path):
    m = mount()
    res = dataset_cli(m, "refresh", "--path", "train/c01")
    assert res.returncode == 0, res.stderr
    bad = dataset_cli(m, "refresh", "--path", "train/../x")
    assert bad.returncode != 0 and "'..'" in bad.stderr and "Traceback" not in bad.stderr
    assert stats(m)["refreshes"] == 1  # the bad request changed nothing
    plain = tmp_path / "plain"
    plain.mkdir()
    res = subprocess.run([sys.executable, "-m", "azfs.cli.main", "dataset", "refresh",
                          str(plain)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode != 0 and "not an azfs mount" in res.stderr
    assert "Traceback" not in res.stderr


def test_negative_entries_expire_with_the_listing_ttl(mount, dataset):
    m = mount("--listing-ttl", "1")
    missing = m.mnt / "train" / "c02" / "probe.bin"
    assert errno_of(lambda: os.stat(missing)) == errno.ENOENT
    dataset.upload("small", {"train/c02/probe.bin": b"found"})
    try:
        # the kernel's negative entry and the listing both expire: no refresh needed
        wait_until(lambda: missing.exists(), timeout=30, what="the new blob after the TTL")
        assert missing.read_bytes() == b"found"
    finally:
        dataset.service_client().get_container_client("small").delete_blob(
            "train/c02/probe.bin")


def test_listing_ttl_is_for_blob_sources_only(tmp_path):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    res = subprocess.run([sys.executable, "-m", "azfs.cli.main", "mount", "--listing-ttl",
                          "5", str(src), str(mnt)], capture_output=True, text=True, cwd=REPO,
                         timeout=60)
    assert res.returncode != 0 and "blob sources only" in res.stderr
    assert not os.path.ismount(mnt)
