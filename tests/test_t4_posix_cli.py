"""``azfs mount``, ``umount`` and ``usage`` as users run them: exit codes, messages, leftovers."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from azfs.cli.main import main as cli_main
from tests.support.fuse import (
    alive,
    as_user,
    azfs,
    azfs_argv,
    daemon_pids,
    errno_of,
    is_mounted,
    wait_for,
)


def assert_refused(res: subprocess.CompletedProcess[str], *words: str) -> None:
    """Non-zero exit and a last stderr line naming the problem, no traceback."""
    assert res.returncode != 0, res
    lines = res.stderr.strip().splitlines()
    assert lines, "no error message"
    assert "Traceback" not in res.stderr
    for word in words:
        assert word in lines[-1], lines[-1]


#: exit statuses of the CLI: a refused request, a command line argparse rejects
REFUSED, USAGE = 1, 2


def assert_one_line(res: subprocess.CompletedProcess[str], status: int, *mnts: Path) -> None:
    """One stderr line, exactly ``status``, and nothing mounted on (or serving) ``mnts``."""
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.returncode == status, (res.returncode, res.stderr)
    for mnt in mnts:
        assert nothing_left(mnt), f"{mnt} is still mounted or served"


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    return src, mnt


def mount_cmd(*args: str, log: Path) -> subprocess.CompletedProcess[str]:
    return azfs("mount", "--log-file", str(log), *args)


def nothing_left(mnt: Path) -> bool:
    return not is_mounted(mnt) and not daemon_pids(mnt)


@pytest.mark.parametrize("case", ["missing-source", "source-is-file", "missing-mountpoint",
                                  "mountpoint-is-file", "same", "mountpoint-in-source",
                                  "source-in-mountpoint", "same-via-symlink"])
def test_bad_paths_are_refused(tmp_path, dirs, case):
    src, mnt = dirs
    (tmp_path / "file").write_text("x")
    args, words = {
        "missing-source": ([tmp_path / "nope", mnt], ["does not exist"]),
        "source-is-file": ([tmp_path / "file", mnt], ["not a directory"]),
        "missing-mountpoint": ([src, tmp_path / "nope"], ["does not exist"]),
        "mountpoint-is-file": ([src, tmp_path / "file"], ["not a directory"]),
        "same": ([src, src], ["contain"]),
        "mountpoint-in-source": ([src, _mkdir(src / "inner")], ["contain"]),
        "source-in-mountpoint": ([_mkdir(mnt / "inner"), mnt], ["contain"]),
        "same-via-symlink": ([_symlink(tmp_path / "alias", src), src], ["contain"]),
    }[case]
    res = mount_cmd(*map(str, args), log=tmp_path / "log")
    assert_refused(res, *words)
    assert_one_line(res, REFUSED, *(Path(p) for p in args if Path(p).is_dir()))


def _mkdir(p: Path) -> Path:
    p.mkdir()
    return p


def _symlink(p: Path, target: Path) -> Path:
    p.symlink_to(target)
    return p


@pytest.mark.parametrize("options, words", [
    (["--quota-files", "-1"], ["--quota-files"]),
    (["--quota-bytes", "-1"], ["--quota-bytes"]),
    (["--quota-bytes", "10X"], ["not a size"]),
    (["--quota-bytes", "lots"], ["not a size"]),
    (["--uid", "-5"], ["--uid"]),
    (["--gid", "abc"], ["--gid"]),
    (["--uid", "4294967295"], ["--uid"]),
    (["--cache-timeout", "soon"], ["--cache-timeout"]),
])
def test_bad_options_are_refused(tmp_path, dirs, options, words):
    src, mnt = dirs
    res = mount_cmd(*options, str(src), str(mnt), log=tmp_path / "log")
    assert_refused(res, *words)
    assert_one_line(res, USAGE, mnt)
    assert os.listdir(src) == []  # not even a ledger


def test_bad_options_give_one_line(tmp_path, dirs):
    src, mnt = dirs
    res = mount_cmd("--quota-bytes", "10X", str(src), str(mnt), log=tmp_path / "log")
    assert_one_line(res, USAGE, mnt)


def test_negative_cache_timeout_is_refused(tmp_path, dirs, mounted):
    src, mnt = dirs
    try:
        res = mount_cmd("--cache-timeout", "-1", str(src), str(mnt), log=tmp_path / "log")
        assert_refused(res, "--cache-timeout")
        assert nothing_left(mnt)
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])


def test_mountpoint_already_mounted(mounted, tmp_path):
    m = mounted()
    (m.mnt / "f").write_text("first")
    other = tmp_path / "other"
    other.mkdir()
    res = mount_cmd(str(other), str(m.mnt), log=tmp_path / "log2")
    assert_refused(res, "already in use")
    assert len(res.stderr.strip().splitlines()) == 1 and res.returncode == REFUSED, res
    assert not daemon_pids(other) and is_mounted(m.mnt)
    assert (m.mnt / "f").read_text() == "first"  # the first mount is unharmed
    assert os.listdir(other) == []


def test_dead_mount_is_reported(mounted, tmp_path):
    m = mounted()
    pid = m.pids[0]
    os.kill(pid, 9)
    wait_for(lambda: not alive(pid), what="daemon death")
    # ECONNABORTED while the kernel is still tearing the connection down
    assert errno_of(lambda: os.listdir(m.mnt)) in (errno.ENOTCONN, errno.ECONNABORTED)
    res = mount_cmd(str(m.source), str(m.mnt), log=tmp_path / "log2")
    assert_refused(res, "umount --lazy")
    res = azfs("umount", "--lazy", str(m.mnt), env=m.env)
    assert res.returncode == 0, res.stderr
    assert not is_mounted(m.mnt)
    m.mount()  # usable again
    assert os.listdir(m.mnt) == []


def test_not_root_is_refused(dirs, tmp_path):
    """As uid 1000 (the CLI's code runs in a forked child: the interpreter may sit where
    that user cannot read it)."""
    src, mnt = dirs
    for p in (tmp_path, src, mnt):
        os.chmod(p, 0o777)
    allow_other = any(line.strip() == "user_allow_other"
                      for line in Path("/etc/fuse.conf").read_text().splitlines()) \
        if Path("/etc/fuse.conf").exists() else False
    if allow_other:
        pytest.skip("/etc/fuse.conf allows non-root mounts with allow_other")

    def run(argv: list[str]) -> tuple[int, str]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli_main(argv)
        return code, err.getvalue()

    # as root first, failing early: loads the modules the CLI imports lazily
    assert run(["mount", "--log-file", str(tmp_path / "log"), str(src),
                str(tmp_path / "missing")])[0] != 0
    code, stderr = as_user(1000, 1000, lambda: run(["mount", "--log-file", "log", "src", "mnt"]),
                           cwd=tmp_path)
    assert code != 0
    assert "root" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert nothing_left(mnt)
    assert os.listdir(src) == []


def test_umount_waits_for_the_daemon_and_leaves_a_clean_ledger(mounted):
    m = mounted()
    (m.mnt / "f").write_bytes(b"x" * 1000)
    pids = list(m.pids)
    assert pids and all(alive(p) for p in pids)
    res = m.umount()
    assert res.stderr == ""
    assert not any(alive(p) for p in pids)  # no wait needed: umount waited
    assert not is_mounted(m.mnt)
    record = json.loads((m.source / ".azfs-meta" / "usage.json").read_text())
    assert record["clean"] is True and record["bytes"] == 1000 and record["files"] == 1


def test_umount_busy_and_lazy(mounted):
    m = mounted()
    (m.mnt / "f").write_text("open me")
    pid = m.pids[0]
    with open(m.mnt / "f") as f:
        res = azfs("umount", str(m.mnt), env=m.env)
        assert_refused(res, "busy")
        assert len(res.stderr.strip().splitlines()) == 1 and res.returncode == REFUSED, res
        assert is_mounted(m.mnt) and alive(pid)  # a refused umount leaves the mount alone
        res = azfs("umount", "--lazy", str(m.mnt), env=m.env)
        assert res.returncode == 0, res.stderr
        assert not is_mounted(m.mnt)
        assert f.read() == "open me"  # still served
    wait_for(lambda: not alive(pid), what="daemon exit after the last close")


def test_umount_errors(tmp_path):
    res = azfs("umount", str(tmp_path))
    assert_refused(res, "not mounted")
    assert_one_line(res, REFUSED, tmp_path)
    res = azfs("umount", "/proc")
    assert_refused(res, "not an azfs mount")
    assert len(res.stderr.strip().splitlines()) == 1 and res.returncode == REFUSED, res
    assert is_mounted("/proc")


def test_foreground_mount(dirs, tmp_path):
    src, mnt = dirs
    proc = subprocess.Popen(azfs_argv() + ["mount", "--foreground", str(src), str(mnt)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, AZFS_RUN_DIR=str(tmp_path / "run")))
    try:
        wait_for(lambda: is_mounted(mnt) or proc.poll() is not None, what="foreground mount")
        assert proc.poll() is None
        (mnt / "f").write_text("fg")
        res = azfs("umount", str(mnt), env=dict(os.environ, AZFS_RUN_DIR=str(tmp_path / "run")))
        assert res.returncode == 0, res.stderr
        assert proc.wait(30) == 0
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (src / "f").read_text() == "fg"
    out = proc.stdout.read() if proc.stdout else ""
    assert "Traceback" not in out


def test_background_daemon_logs_to_the_log_file(mounted):
    m = mounted()
    m.umount()
    text = m.log_text()
    assert "serving" in text and "unmounted" in text


def test_usage_command(mounted):
    m = mounted()
    (m.mnt / "a").write_bytes(b"a" * 123)
    (m.mnt / "d").mkdir()

    def current() -> dict:
        return json.loads(azfs("usage", "--json", str(m.source), env=m.env).stdout)

    # the ledger is persisted periodically while mounted
    wait_for(lambda: current() == {"bytes": 123, "files": 2, "in_use": True},
             what="the ledger to be persisted")
    m.umount()
    res = azfs("usage", str(m.source), env=m.env)
    assert res.returncode == 0
    assert "123 bytes" in res.stdout and "2 files" in res.stdout
    assert json.loads(azfs("usage", "--json", str(m.source)).stdout)["in_use"] is False
