"""Helpers for fixtures that start real services (etcd, Azurite, PostgreSQL...).

Services listen on loopback on free ports, keep their data in temp dirs, and
are always stopped by the fixture that started them.

A service that is not installed is a test *failure* (:func:`missing_service`),
so a broken install step cannot give a green run.  A developer without, say,
PostgreSQL may ask for skips instead with ``AZFS_ALLOW_MISSING_SERVICES=1``;
that request is ignored under ``CI=true`` and ``AZFS_REQUIRE_SERVICES=1``
(which ``packaging/test.sh`` sets).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import pytest


def services_required() -> bool:
    """False only when a developer asked for skips and nothing insists on services."""
    if os.environ.get("CI", "").lower() == "true" or \
            os.environ.get("AZFS_REQUIRE_SERVICES") == "1":
        return True
    return os.environ.get("AZFS_ALLOW_MISSING_SERVICES") != "1"


def missing_service(reason: str) -> NoReturn:
    """Fails the test because ``reason`` (a service is not installed), or skips on request."""
    if services_required():
        pytest.fail(f"{reason}; a missing service fails the suite (a developer may set "
                    "AZFS_ALLOW_MISSING_SERVICES=1 to skip instead, outside CI)",
                    pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Polls ``predicate``; fails early with the service's log if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {_tail(log)}")
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout}s: {_tail(log)}")


def _tail(log: Path | None, lines: int = 20) -> str:
    if log is None or not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; also reaps the process group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)


@contextlib.contextmanager
def running(cmd: Sequence[str], log: Path, ready: Callable[[], bool], what: str,
            timeout: float = 30.0, **popen: object) -> Iterator[subprocess.Popen]:
    """Starts ``cmd`` in its own process group, waits for ``ready``, always stops it."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, **popen)  # type: ignore[arg-type]
    try:
        wait_until(ready, timeout, what, proc, log)
        yield proc
    finally:
        stop_process(proc)
