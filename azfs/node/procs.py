"""Detached service processes with pid files, logs and readiness checks.

A service runs in a session of its own (so it outlives the ``azfs up`` that
started it and a terminal hang-up), writes to its log file, and is known by
its pid file.  A pid is trusted only if the process is alive (not a zombie)
and its command line names the node's state directory: a pid reused by an
unrelated process after a reboot is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from azfs.errors import UserError
from azfs.secret import redact


class ServiceFailed(UserError):
    """A service did not come up; the message quotes the end of its log."""


@dataclass
class Service:
    """One detached process of the node."""

    name: str
    argv: Sequence[str]
    pid_file: Path
    log: Path
    #: a string the process's command line must contain (the state dir)
    marker: str
    ready: Callable[[], bool]
    timeout: float = 60.0
    env: Mapping[str, str] | None = None
    #: extra check after a start, for a clearer error than a timeout (None: fine)
    diagnose: Callable[[], str | None] = field(default=lambda: None)

    def pid(self) -> int | None:
        """The running process of this service, or None."""
        return trusted_pid(self.pid_file, self.marker)

    def start(self) -> int:
        """Starts the process detached and waits until it is ready; raises ServiceFailed."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            out.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {self.name}\n"
                      .encode())
            out.flush()
            proc = subprocess.Popen(list(self.argv), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    cwd="/", env=dict(self.env) if self.env else None)
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + self.timeout
        while True:
            code = proc.poll()
            if code is not None:
                self.pid_file.unlink(missing_ok=True)
                raise ServiceFailed(f"{self.name} exited with status {code} while starting; "
                                    f"last lines of {self.log}:\n{tail(self.log)}")
            if self.ready():
                return proc.pid
            if time.monotonic() > deadline:
                stop_pid(proc.pid, self.name, timeout=10)
                self.pid_file.unlink(missing_ok=True)
                hint = self.diagnose() or f"not ready after {self.timeout:.0f}s"
                raise ServiceFailed(f"{self.name}: {hint}; last lines of {self.log}:\n"
                                    f"{tail(self.log)}")
            time.sleep(0.1)

    def wait_ready(self, pid: int) -> None:
        """Waits for an already running process to answer (e.g. one still starting)."""
        deadline = time.monotonic() + self.timeout
        while not self.ready():
            if not alive(pid):
                raise ServiceFailed(f"{self.name} (pid {pid}) exited; last lines of "
                                    f"{self.log}:\n{tail(self.log)}")
            if time.monotonic() > deadline:
                raise ServiceFailed(f"{self.name} (pid {pid}) is running but does not "
                                    f"answer; last lines of {self.log}:\n{tail(self.log)}")
            time.sleep(0.1)

    def stop(self, timeout: float = 20.0) -> bool:
        """SIGTERM (then SIGKILL after ``timeout``); True if a process was stopped."""
        pid = self.pid()
        stopped = False
        if pid is not None:
            stop_pid(pid, self.name, timeout)
            stopped = True
        self.pid_file.unlink(missing_ok=True)
        return stopped


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def trusted_pid(pid_file: Path, marker: str) -> int | None:
    """The pid in ``pid_file`` if that process is alive and its command line has ``marker``."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if pid <= 1 or not alive(pid) or marker not in cmdline(pid):
        return None
    return pid


def stop_pid(pid: int, what: str, timeout: float = 20.0) -> None:
    """Stops ``pid`` (and its process group if it leads one): SIGTERM, then SIGKILL."""
    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)

    send(signal.SIGTERM)
    if _wait_gone(pid, timeout):
        return
    send(signal.SIGKILL)
    if not _wait_gone(pid, 10):
        raise UserError(f"{what} (pid {pid}) does not stop even after SIGKILL "
                        "(hung in the kernel?)")


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)  # reap if it is our own child
        if not alive(pid):
            return True
        time.sleep(0.05)
    return not alive(pid)


def tail(log: Path, lines: int = 15) -> str:
    """The last lines the latest start wrote to a log, secrets masked, indented."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "    (no log)"
    recent = text.splitlines()
    starts = [i for i, line in enumerate(recent) if line.startswith("--- ")]
    if starts:  # only what the last start wrote
        recent = recent[starts[-1] + 1:]
    return "\n".join("    " + redact(line) for line in recent[-lines:]) or "    (empty log)"
