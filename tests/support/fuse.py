"""Real azfs FUSE mounts for tests: mount with the CLI, find the daemon, always clean up.

A :class:`Mount` is made by ``azfs mount`` (background mode, so the CLI's own
readiness protocol is exercised) and torn down by :func:`cleanup`, which works
whatever state the test left it in: mounted, unmounted, or with a dead daemon.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from azfs.volumes.mountinfo import find_mount

REPO = Path(__file__).resolve().parents[2]


def azfs_argv() -> list[str]:
    """The console script of the venv, or the module run by this interpreter."""
    script = Path(sys.executable).with_name("azfs")
    return [str(script)] if script.exists() else [sys.executable, "-m", "azfs.cli.main"]


def azfs(*args: str, env: dict[str, str] | None = None, timeout: float = 60.0,
         prefix: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """Runs the ``azfs`` command (under ``prefix``, e.g. prlimit); never raises on failure."""
    return subprocess.run([*prefix, *azfs_argv(), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, stdin=subprocess.DEVNULL)


def is_mounted(path: str | os.PathLike[str]) -> bool:
    return find_mount(path) is not None


def daemon_pids(mountpoint: str | os.PathLike[str]) -> list[int]:
    """Pids of azfs daemons serving ``mountpoint`` (from the process list)."""
    target = os.fsencode(os.path.abspath(mountpoint))
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"--foreground" in argv and b"mount" in argv and target in argv:
            pids.append(int(entry))
    return pids


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what or predicate}")
        time.sleep(0.02)


@dataclass
class Mount:
    """One vfolder mounted by ``azfs mount``; restartable with the same options."""

    source: Path
    mnt: Path
    options: Sequence[str]
    log: Path
    env: dict[str, str]
    #: command prefix for the daemon (e.g. resource limits)
    prefix: Sequence[str] = ()
    pids: list[int] = field(default_factory=list)
    #: ``--allow-other``: the tests act as other uids, as kernels do through the agent
    allow_other: bool = True

    def mount(self) -> None:
        flags = ["--allow-other"] if self.allow_other else []
        res = azfs("mount", "--log-file", str(self.log), *flags, *self.options,
                   str(self.source), str(self.mnt), env=self.env, prefix=self.prefix)
        if res.returncode != 0:
            raise RuntimeError(f"azfs mount failed ({res.returncode}): {res.stderr.strip()}\n"
                               f"{self.log_text()}")
        assert is_mounted(self.mnt), "azfs mount returned before the mount was ready"
        self.pids = daemon_pids(self.mnt)

    def umount(self, *flags: str) -> subprocess.CompletedProcess[str]:
        res = azfs("umount", *flags, str(self.mnt), env=self.env)
        if res.returncode != 0:
            raise RuntimeError(f"azfs umount failed: {res.stderr.strip()}")
        return res

    def remount(self) -> None:
        self.umount()
        self.mount()

    def kill(self) -> None:
        """SIGKILLs the daemon (a crash) and detaches the dead mount."""
        pids = self.pids or daemon_pids(self.mnt)
        assert pids, "no daemon found for the mount"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        for pid in pids:
            wait_for(lambda pid=pid: not alive(pid), what=f"daemon {pid} to die")
        subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        self.pids = []

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


def cleanup(m: Mount) -> None:
    """Unmounts (lazily, so a busy or dead mount goes too) and ends the daemon."""
    pids = set(m.pids) | set(daemon_pids(m.mnt))
    for _ in range(5):
        if not is_mounted(m.mnt):
            break
        subprocess.run(["fusermount3", "-u", "-z", str(m.mnt)], capture_output=True)
    deadline = time.monotonic() + 10
    for pid in pids:
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# ---- running code as another user --------------------------------------------------
def as_user(uid: int, gid: int, fn: Callable[[], Any], cwd: str | os.PathLike[str]) -> Any:
    """Runs ``fn`` in a forked child with uid/gid dropped, in ``cwd``; returns its result.

    ``cwd`` is entered before dropping privileges, so it may sit below
    directories the user cannot traverse (pytest's temp root is 0700).
    An ``OSError`` in the child comes back as the same ``OSError``.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(read_end)
            os.chdir(cwd)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            try:
                result: Any = ("ok", fn())
            except OSError as exc:
                result = ("oserror", exc.errno)
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                result = ("error", repr(exc))
            with os.fdopen(write_end, "wb") as out:
                pickle.dump(result, out)
        except BaseException:  # noqa: BLE001 - never return into pytest in the child
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as inp:
        data = inp.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        raise RuntimeError(f"child as uid {uid} failed (status {status})")
    kind, value = pickle.loads(data)
    if kind == "oserror":
        raise OSError(value, os.strerror(value))
    if kind == "error":
        raise RuntimeError(value)
    return value


def errno_of(fn: Callable[[], Any]) -> int:
    """The errno ``fn`` fails with, or 0 when it succeeds."""
    try:
        fn()
    except OSError as exc:
        return exc.errno or errno.EIO
    return 0
