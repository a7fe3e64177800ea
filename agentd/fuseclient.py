"""agentd's side of the FUSE process: the socket client and the process lifecycle.

:class:`FuseHostClient` sends one JSON-lines request per connection to the
fusehost's private socket.  :func:`ensure_fusehost` is what agentd runs at
start and whenever its watchdog finds the fusehost gone:

* a fusehost that answers ``health`` and whose mount answers ``stat`` is
  reused as is (agentd was restarted; containers never noticed);
* a fusehost process that no longer answers is killed (its mount is dead
  for containers anyway);
* a mount left at the mountpoint without a live fusehost (``ENOTCONN``
  after a crash, or an orphan) is detached lazily;
* then a new fusehost is started in a session of its own (so that signals
  to agentd's process group never reach it) and awaited until it serves.

The caller re-attaches the views of its journal after a (re)start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from azfs.volumes.hostmount import is_stale, lazy_unmount
from azfs.volumes.io import IOLimits
from azfs.volumes.mountinfo import mounts_at

log = logging.getLogger("agentd.fuseclient")

CALL_TIMEOUT = 60.0
START_TIMEOUT = 30.0
FSTYPE = "fuse.azfs"


class FuseHostError(Exception):
    """The fusehost refused a request; ``code`` is its stable error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class FuseHostUnavailable(Exception):
    """The fusehost does not answer on its socket."""


class FuseHostClient:
    """Requests over a small pool of kept-open connections (one request at a time each)."""

    def __init__(self, socket_path: Path, timeout: float = CALL_TIMEOUT,
                 pool_size: int = 16) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout
        self.pool_size = pool_size
        self._idle: list[tuple[trio.SocketStream, bytearray]] = []

    async def call(self, op: str, **args: Any) -> Any:
        request = json.dumps({"op": op, **args}).encode() + b"\n"
        for attempt in (0, 1):
            reused = bool(self._idle)
            try:
                line = await self._exchange(request)
                break
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                    trio.TooSlowError, FuseHostUnavailable) as exc:
                if reused and attempt == 0 and not isinstance(exc, trio.TooSlowError):
                    continue  # a kept connection of a fusehost since gone: try a fresh one
                if isinstance(exc, FuseHostUnavailable):
                    raise
                raise FuseHostUnavailable(f"the fusehost does not answer: "
                                          f"{getattr(exc, 'strerror', None) or exc!s}") \
                    from None
        answer = json.loads(line)
        if not answer.get("ok"):
            raise FuseHostError(str(answer.get("code")), str(answer.get("message")))
        return answer.get("result")

    async def _exchange(self, request: bytes) -> bytes:
        if self._idle:
            stream, buf = self._idle.pop()
        else:
            with trio.fail_after(self.timeout):
                stream = await trio.open_unix_socket(str(self.socket_path))
            buf = bytearray()
        ok = False
        try:
            with trio.fail_after(self.timeout):
                await stream.send_all(request)
                while b"\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        raise FuseHostUnavailable("the fusehost closed the connection")
                    buf += data
            line, _, rest = bytes(buf).partition(b"\n")
            ok = True
            return line
        finally:
            if ok and len(self._idle) < self.pool_size:
                self._idle.append((stream, bytearray(rest)))
            else:
                with trio.CancelScope(shield=True):
                    await stream.aclose()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for stream, _ in idle:
            await stream.aclose()

    async def attach(self, path: list[str], view: dict, backend: dict, digest: str) -> dict:
        return await self.call("attach", path=path, view=view, backend=backend, digest=digest)

    async def detach(self, path: list[str]) -> dict:
        return await self.call("detach", path=path)

    async def refresh(self, path: list[str]) -> dict:
        return await self.call("refresh", path=path)

    async def list(self) -> list[dict]:
        return (await self.call("list"))["views"]

    async def stats(self) -> dict:
        return await self.call("stats")

    async def health(self) -> dict:
        return await self.call("health")


@dataclass(frozen=True)
class FuseHostSpec:
    """How to start the node's fusehost."""

    mountpoint: Path
    socket_path: Path
    pid_file: Path
    log_file: Path
    cache_dir: Path | None = None
    cache_bytes: int = 0
    volume_io: IOLimits = field(default_factory=IOLimits)
    xattrs: bool = False
    listing_entries: int = 500_000
    debug: bool = False

    def argv(self) -> list[str]:
        io = self.volume_io
        argv = [sys.executable, "-m", "agentd.fusehost", "--mountpoint", str(self.mountpoint),
                "--socket", str(self.socket_path), "--io-threads", str(io.threads),
                "--metadata-deadline", str(io.metadata_deadline),
                "--data-deadline", str(io.data_deadline), "--io-mode", io.mode,
                "--listing-entries", str(self.listing_entries)]
        if self.cache_dir is not None and self.cache_bytes > 0:
            argv += ["--cache-dir", str(self.cache_dir), "--cache-bytes", str(self.cache_bytes)]
        if self.xattrs:
            argv.append("--xattrs")
        if self.debug:
            argv.append("--debug")
        return argv


def mount_state(mountpoint: Path) -> str:
    """``absent``, ``healthy`` (an azfs mount that answers) or ``stale``. Blocking."""
    entries = mounts_at(mountpoint)
    if not entries:
        return "absent"
    if entries[-1].fstype != FSTYPE:
        return "foreign"
    return "stale" if is_stale(mountpoint, timeout=5.0) else "healthy"


def read_pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if is_fusehost(pid) else None


def is_fusehost(pid: int) -> bool:
    """True if ``pid`` runs ``agentd.fusehost`` (a recycled pid is not ours)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return b"agentd.fusehost" in cmdline


async def ensure_fusehost(spec: FuseHostSpec) -> tuple[FuseHostClient, bool]:
    """A serving fusehost for ``spec``; True if it was (re)started (views to restore)."""
    client = FuseHostClient(spec.socket_path, timeout=10.0)
    health = None
    with contextlib.suppress(FuseHostUnavailable, FuseHostError):
        health = await client.health()
    state = await trio.to_thread.run_sync(mount_state, spec.mountpoint)
    if health is not None and state == "healthy":
        log.info("reusing the running fusehost (pid %s) with %s views",
                 health.get("pid"), health.get("views"))
        want = (str(spec.cache_dir) if spec.cache_dir and spec.cache_bytes else None,
                spec.cache_bytes if spec.cache_dir else 0)
        have = (health.get("cache_dir"), health.get("cache_bytes") or 0)
        if have[0] != want[0] or (want[0] and have[1] != want[1]):
            log.warning("the running fusehost has another block cache config (%s, %s bytes); "
                        "the new one applies when the fusehost restarts", *have)
        if bool(health.get("xattrs")) != spec.xattrs:
            log.warning("the running fusehost has xattrs = %s; the new setting applies when "
                        "the fusehost restarts (azfs agent restart-fuse)",
                        str(bool(health.get("xattrs"))).lower())
        return FuseHostClient(spec.socket_path), False
    pid = health.get("pid") if health else read_pid(spec.pid_file)
    if pid is not None and is_fusehost(int(pid)):
        log.warning("fusehost pid %s is unusable (mount %s); stopping it", pid, state)
        await trio.to_thread.run_sync(_kill, int(pid))
        state = await trio.to_thread.run_sync(mount_state, spec.mountpoint)
    if state == "foreign":
        raise RuntimeError(f"{spec.mountpoint} holds another filesystem; refusing to mount "
                           "over it")
    if state in ("stale", "healthy"):
        log.warning("cleaning the %s FUSE mount left at %s", state, spec.mountpoint)
        await trio.to_thread.run_sync(lazy_unmount, spec.mountpoint)
    await trio.to_thread.run_sync(start_fusehost, spec)
    return FuseHostClient(spec.socket_path), True


def _kill(pid: int, grace: float = 5.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and is_fusehost(pid):
        _reap(pid)
        time.sleep(0.05)
    if is_fusehost(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while is_fusehost(pid):
            _reap(pid)
            time.sleep(0.05)
    _reap(pid)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def start_fusehost(spec: FuseHostSpec) -> int:
    """Starts the fusehost in its own session and waits until it serves. Blocking."""
    spec.mountpoint.mkdir(parents=True, exist_ok=True)
    spec.socket_path.parent.mkdir(parents=True, exist_ok=True)
    spec.socket_path.unlink(missing_ok=True)
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with open(spec.log_file, "ab") as out:
        proc = subprocess.Popen(spec.argv(), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                close_fds=True, cwd="/")  # pin no mount as its cwd
    spec.pid_file.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the fusehost exited with status {proc.returncode}; "
                               f"see {spec.log_file}")
        if spec.socket_path.exists() and mounts_at(spec.mountpoint):
            log.info("started fusehost pid %d at %s", proc.pid, spec.mountpoint)
            return proc.pid
        time.sleep(0.02)
    _kill(proc.pid)
    raise RuntimeError(f"the fusehost did not start within {START_TIMEOUT:g}s; "
                       f"see {spec.log_file}")


async def stop_fusehost(spec: FuseHostSpec, client: FuseHostClient) -> None:
    """Unmounts: SIGTERM to the fusehost, which unmounts and exits."""
    pid = None
    with contextlib.suppress(FuseHostUnavailable, FuseHostError):
        pid = (await client.health()).get("pid")
    pid = pid or read_pid(spec.pid_file)
    if pid is not None and is_fusehost(int(pid)):
        await trio.to_thread.run_sync(_kill, int(pid), 30.0)
    if mounts_at(spec.mountpoint):
        await trio.to_thread.run_sync(lazy_unmount, spec.mountpoint)
    spec.pid_file.unlink(missing_ok=True)
