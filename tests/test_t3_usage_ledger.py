"""The usage ledger in-process: scans, quota checks, persistence and crash detection."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from azfs import usage
from azfs.errors import QuotaExceeded
from azfs.usage import (
    LEDGER_VERSION,
    META_DIR,
    Quota,
    UsageLedger,
    init_ledger,
    read_usage,
    scan_usage,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "vfolder"
    r.mkdir()
    return r


@pytest.fixture
def root_fd(root: Path) -> Iterator[int]:
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def ledger_file(root: Path) -> Path:
    return root / META_DIR / "usage.json"


def test_scan_counts_each_inode_once_and_never_follows_links(root, root_fd, tmp_path):
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "f").write_bytes(b"x" * 100)
    (root / "a" / "b" / "g").write_bytes(b"y" * 50)
    os.link(root / "a" / "f", root / "hard")
    os.link(root / "a" / "f", root / "a" / "b" / "hard2")
    big = tmp_path / "outside-big"
    big.write_bytes(b"z" * 10_000)
    os.symlink(big, root / "to-outside")
    os.symlink(tmp_path, root / "dir-outside")
    os.mkfifo(root / "fifo")
    with open(root / "sparse", "wb") as f:
        f.truncate(1 << 30)  # apparent size counts, not blocks
    (root / META_DIR).mkdir()
    (root / META_DIR / "usage.json").write_text("x" * 999)
    (root / "a" / META_DIR).mkdir()  # only the root's meta dir is special
    # a, a/b, a/f(+2 links), a/b/g, to-outside, dir-outside, fifo, sparse, a/.azfs-meta
    assert scan_usage(root_fd) == (100 + 50 + (1 << 30), 9)


def test_scan_of_an_empty_tree(root_fd):
    assert scan_usage(root_fd) == (0, 0)


def test_load_without_a_ledger_scans_and_marks_in_use(root, root_fd):
    (root / "f").write_bytes(b"abc")
    ledger = UsageLedger(root_fd)
    assert ledger.load() is True
    assert (ledger.bytes, ledger.files) == (3, 1)
    record = json.loads(ledger_file(root).read_text())
    assert record["clean"] is False and record["bytes"] == 3
    ledger.close()
    assert json.loads(ledger_file(root).read_text())["clean"] is True
    assert read_usage(root) == (3, 1, True)


def test_clean_ledger_is_trusted_without_a_scan(root, root_fd):
    (root / "f").write_bytes(b"abc")
    init_ledger(root)
    assert read_usage(root) == (3, 1, True)
    (root / "g").write_bytes(b"not seen, since the ledger is trusted")
    ledger = UsageLedger(root_fd)
    assert ledger.load() is False
    assert (ledger.bytes, ledger.files) == (3, 1)
    assert read_usage(root)[2] is False  # in use from now on


@pytest.mark.parametrize("content", [
    None,  # unclean: a crash
    "not json",
    json.dumps({"version": 999, "bytes": 1, "files": 1, "clean": True}),
    json.dumps({"version": LEDGER_VERSION, "bytes": "many", "files": 1, "clean": True}),
    json.dumps({"version": LEDGER_VERSION, "files": 1, "clean": True}),
    json.dumps({"version": LEDGER_VERSION, "bytes": 1, "files": 1, "holders": [1]}),
    json.dumps([1, 2, 3]),
])
def test_unclean_or_damaged_ledger_is_rebuilt(root, root_fd, content, monkeypatch):
    (root / "f").write_bytes(b"x" * 10)
    ledger = UsageLedger(root_fd)
    ledger.load()
    ledger.add(bytes_delta=5000, files_delta=7)  # drift that a crash must not keep
    monkeypatch.setattr(usage, "FLUSH_INTERVAL", 0.0)
    ledger.flush_if_due()
    assert json.loads(ledger_file(root).read_text())["bytes"] == 5010
    if content is None:
        # the holder's process died without unregistering: a pid that cannot exist
        record = json.loads(ledger_file(root).read_text())
        pid_max = int(open("/proc/sys/kernel/pid_max").read())
        (holder,) = record["holders"]
        host = holder.split(":")[0]
        record["holders"] = {f"{host}:{pid_max + 1}:1:dead": record["holders"][holder]}
        ledger_file(root).write_text(json.dumps(record))
    else:
        ledger_file(root).write_text(content)
    again = UsageLedger(root_fd)
    assert again.load() is True
    assert (again.bytes, again.files) == (10, 1)


def test_ledger_symlink_is_replaced_not_followed(root, root_fd, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (root / META_DIR).mkdir()
    os.symlink(victim, ledger_file(root))
    ledger = UsageLedger(root_fd)
    assert ledger.load() is True
    ledger.close()
    assert victim.read_text() == "precious"
    assert not ledger_file(root).is_symlink()
    assert read_usage(root) == (0, 0, True)


def test_meta_dir_symlink_is_never_followed(root, root_fd, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / META_DIR)
    ledger = UsageLedger(root_fd)
    with pytest.raises(OSError):
        ledger.load()
    assert os.listdir(outside) == []


def test_quota_checks():
    with pytest.raises(ValueError):
        Quota(bytes=-1)
    with pytest.raises(ValueError):
        Quota(files=-1)
    ledger = UsageLedger(-1, Quota(bytes=100, files=2))
    ledger.check_bytes(100)
    ledger.check_bytes(-50)
    with pytest.raises(QuotaExceeded):
        ledger.check_bytes(101)
    ledger.add(bytes_delta=60, files_delta=2)
    ledger.check_bytes(40)
    ledger.check_bytes(0)
    with pytest.raises(QuotaExceeded):
        ledger.check_bytes(41)
    with pytest.raises(QuotaExceeded):
        ledger.check_files(1)
    ledger.add(files_delta=-1)
    ledger.check_files(1)
    unlimited = UsageLedger(-1)
    unlimited.add(bytes_delta=1 << 50, files_delta=1 << 30)
    unlimited.check_bytes(1 << 50)
    unlimited.check_files(1 << 30)


def test_counters_never_go_negative():
    ledger = UsageLedger(-1)
    ledger.add(bytes_delta=-10, files_delta=-1)
    assert (ledger.bytes, ledger.files) == (0, 0)


def test_flush_only_when_due_and_changed(root, root_fd, monkeypatch):
    ledger = UsageLedger(root_fd)
    ledger.load()
    written = ledger_file(root).stat().st_mtime_ns
    ledger.add(bytes_delta=7)
    monkeypatch.setattr(usage, "FLUSH_INTERVAL", 3600.0)
    ledger.flush_if_due()
    assert json.loads(ledger_file(root).read_text())["bytes"] == 0  # not yet due
    monkeypatch.setattr(usage, "FLUSH_INTERVAL", 0.0)
    ledger.flush_if_due()
    record = json.loads(ledger_file(root).read_text())
    assert record["bytes"] == 7 and record["clean"] is False
    os.utime(ledger_file(root), ns=(written, written))
    ledger.flush_if_due()  # nothing changed: no rewrite
    assert ledger_file(root).stat().st_mtime_ns == written


def test_read_usage_of_a_folder_never_served(root):
    with pytest.raises(LookupError):
        read_usage(root)
    assert not (root / META_DIR).exists()


def test_init_ledger_scans(root):
    (root / "d").mkdir()
    (root / "d" / "f").write_bytes(b"q" * 42)
    init_ledger(root)
    assert read_usage(root) == (42, 2, True)
    assert oct((root / META_DIR).stat().st_mode & 0o777) == "0o700"


def test_two_holders_merge_their_changes(root, root_fd, monkeypatch):
    """Two daemons serving one vfolder (kernels on two nodes) both count."""
    monkeypatch.setattr(usage, "FLUSH_INTERVAL", 0.0)
    (root / "f").write_bytes(b"x" * 10)
    first, second = UsageLedger(root_fd), UsageLedger(root_fd)
    assert first.load() is True
    assert second.load() is False  # the first is alive: its record is trusted
    first.add(bytes_delta=100, files_delta=1)
    second.add(bytes_delta=1000, files_delta=2)
    first.flush_if_due()
    second.flush_if_due()
    assert (second.bytes, second.files) == (1110, 4)  # sees the other's merged change
    assert read_usage(root) == (1110, 4, False)
    first.close()
    assert read_usage(root)[2] is False  # the second still holds it
    second.close()
    assert read_usage(root) == (1110, 4, True)


def test_read_only_ledger_never_writes(root, root_fd):
    (root / "f").write_bytes(b"x" * 10)
    ledger = UsageLedger(root_fd, read_only=True)
    assert ledger.load() is True
    assert (ledger.bytes, ledger.files) == (10, 1)
    ledger.close()
    assert not (root / META_DIR).exists()


def test_holder_with_a_reused_pid_is_dead(root, root_fd, monkeypatch):
    """A crashed holder whose pid now belongs to another process is not trusted."""
    monkeypatch.setattr(usage, "FLUSH_INTERVAL", 0.0)
    (root / "f").write_bytes(b"x" * 10)
    ledger = UsageLedger(root_fd)
    ledger.load()
    ledger.add(bytes_delta=999)
    ledger.flush_if_due()
    record = json.loads(ledger_file(root).read_text())
    (holder,) = record["holders"]
    host, pid, _start, token = holder.split(":")
    # same live pid (ours), another start time: the process that held it is gone
    record["holders"] = {f"{host}:{pid}:12345:{token}": record["holders"][holder]}
    ledger_file(root).write_text(json.dumps(record))
    again = UsageLedger(root_fd)
    assert again.load() is True
    assert (again.bytes, again.files) == (10, 1)


def test_concurrent_merges_count_a_delta_once(root, root_fd):
    """A close() overlapping a housekeeping tick (two merges at once) merges each
    change exactly once."""
    import threading

    ledger = UsageLedger(root_fd)
    ledger.load()
    for _ in range(20):
        ledger.add(bytes_delta=1000, files_delta=1)
        barrier = threading.Barrier(2)

        def merge(barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            ledger._merge(unregister=False)

        threads = [threading.Thread(target=merge) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    record = json.loads(ledger_file(root).read_text())
    assert (record["bytes"], record["files"]) == (20_000, 20)
    assert (ledger.bytes, ledger.files) == (20_000, 20)
    ledger.close()


def test_a_scan_that_runs_out_of_descriptors_fails_instead_of_undercounting(root):
    """A usage number that cannot be known is an error, never a smaller number."""
    import subprocess
    import sys

    deep = root
    for i in range(60):  # the walk holds one descriptor per level
        deep = deep / f"d{i}"
    deep.mkdir(parents=True)
    (deep / "f").write_bytes(b"x" * 10)
    script = (
        "import os, resource, sys\n"
        "from azfs.usage import scan_usage\n"
        "fd = os.open(sys.argv[1], os.O_PATH | os.O_DIRECTORY)\n"
        "print(scan_usage(fd))\n"  # enough descriptors: the whole tree
        "resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))\n"
        "try:\n"
        "    print('counted', scan_usage(fd))\n"
        "except OSError as exc:\n"
        "    print('error', exc.errno)\n")
    out = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True,
                         text=True, timeout=60, check=True).stdout.split("\n")
    assert out[0] == "(10, 61)"
    assert out[1] == f"error {errno.EMFILE}"


def test_an_idle_holder_under_a_quota_sees_the_others_writes(root, root_fd, monkeypatch):
    """SEMANTICS, Quotas: a node idle under a quota re-reads the shared total every
    second, so its next write is checked against the other nodes' writes."""
    monkeypatch.setattr(usage, "FLUSH_INTERVAL", 0.0)
    writer, idle = UsageLedger(root_fd, Quota(bytes=1000)), UsageLedger(root_fd, Quota(bytes=1000))
    writer.load()
    idle.load()
    writer.charge(bytes_delta=900)
    writer.flush_if_due()
    idle.flush_if_due()  # nothing of its own to merge
    assert idle.bytes == 900
    with pytest.raises(QuotaExceeded):
        idle.charge(bytes_delta=200)
    writer.close()
    idle.close()
