"""Mounting remote volumes on a host, refcounted, at ``STATE_DIR/volumes/<name>``.

Invariants:

* ``acquire`` mounts on first use and ``release`` unmounts on last release,
  except ``startup`` volumes, which stay until :meth:`HostMounter.release_all`.
  One :class:`trio.Lock` per volume serialises its mount and unmount, so any
  storm of concurrent acquire/release leaves exactly the mounts still in use.
* Whether a volume is mounted is read from ``/proc/self/mountinfo`` each time,
  never remembered: a mount that vanished is mounted again, one left by an
  earlier run is adopted, and a stale one (``ENOTCONN``, ``ESTALE``, ``EIO``,
  ``EHOSTDOWN`` on stat, confirmed by a one-entry readdir) is unmounted lazily
  and mounted again.
* cifs passwords go to a ``credentials=`` file of mode 0600 in a 0700
  directory that exists only while mount(8) runs: never on a command line,
  in a child's environment or in ``/proc/mounts``.
* A failed mount leaves nothing behind (no mount, no credentials file, no
  empty mount point) and raises :class:`MountError` naming the volume, with
  mount(8)'s message, secrets redacted.
* Every blocking step (mount(8), umount, stat probes) runs in a thread with a
  timeout, so hung storage cannot hang the caller's event loop.
* ``volumes/`` is root-only (0700, see :mod:`azfs.hostdirs`): no other user
  of the host reaches the vfolders on a mounted volume.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from azfs.errors import AzfsError, UserError
from azfs.hostdirs import ensure_private_dir
from azfs.secret import redact
from azfs.volumes import mountinfo
from azfs.volumes.model import (
    CIFS_FSTYPES,
    Volume,
    join_options,
    split_options,
    validate_name,
)

log = logging.getLogger(__name__)

#: errnos of a mount whose server or FUSE daemon is gone.
STALE_ERRNOS = frozenset({errno.ENOTCONN, errno.ESTALE, errno.EIO, errno.EHOSTDOWN,
                          errno.ECONNABORTED})  # a FUSE mount whose daemon is dying
#: The options Azure Files operators use for SMB (as the Azure Files CSI driver
#: does); ``uid``/``gid`` are added from the mounter.  The config overrides any.
#: Azure Files keeps no POSIX modes, so cifs shows every file with ``file_mode``:
#: 0700 (not the CSI driver's 0777) keeps the share root's alone on the host,
#: and files still executable for the kernels, to which the FUSE layer presents
#: them as their own uid's.
AZURE_FILES_DEFAULTS: tuple[tuple[str, str | None], ...] = (
    ("actimeo", "30"), ("mfsymlinks", None), ("nosharesock", None),
    ("cache", "strict"), ("nobrl", None), ("file_mode", "0700"), ("dir_mode", "0700"),
)
#: cifs options that go to the credentials file instead of the command line.
_CREDENTIAL_KEYS = {"username": "username", "user": "username", "domain": "domain",
                    "dom": "domain", "workgroup": "domain"}
_SAFE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
MNT_DETACH = 2


class MountError(AzfsError):
    """A volume could not be mounted or unmounted; the message is safe to show."""


@dataclass(frozen=True)
class MountResult:
    returncode: int
    output: str


#: Runs a mount(8) command line (argv, timeout in seconds) and reports how it went.
MountRunner = Callable[[Sequence[str], float], MountResult]


def run_mount_command(argv: Sequence[str], timeout: float) -> MountResult:
    """The real runner: mount(8) with a clean environment and no stdin."""
    try:
        done = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout, env=dict(_SAFE_ENV), check=False)
    except subprocess.TimeoutExpired:
        return MountResult(124, f"timed out after {timeout:g}s")
    except OSError as exc:
        return MountResult(127, f"cannot run {argv[0]}: {exc.strerror}")
    return MountResult(done.returncode, (done.stderr or done.stdout or "").strip())


@dataclass(frozen=True)
class MountPlan:
    """What mounting one volume takes: the command line and the credentials file text."""

    argv: list[str]
    credentials: str | None  # cifs credentials file content (holds the password)


def plan_mount(volume: Volume, target: Path, uid: int, gid: int,
               credentials_file: Path | None = None, mount_binary: str = "mount") -> MountPlan:
    """The mount(8) command for ``volume`` at ``target`` (pure; no side effects).

    For cifs, ``credentials_file`` is where the caller will write
    :attr:`MountPlan.credentials` before running the command.
    """
    spec = volume.mount
    options = split_options(spec.options)
    if spec.fstype in CIFS_FSTYPES:
        credentials: list[str] = []
        kept: list[tuple[str, str | None]] = []
        for key, value in options:
            field = _CREDENTIAL_KEYS.get(key.lower())
            if field and value is not None:
                credentials.append(f"{field}={value}")
            else:
                kept.append((key, value))
        has_own_file = any(k.lower() in ("credentials", "cred") for k, _ in kept)
        if spec.password is not None:
            if has_own_file:
                raise MountError(f"volume {volume.name!r}: options give both a password "
                                 "and a credentials file; keep one")
            credentials.append(f"password={spec.password.reveal()}")
        keys = {k.lower() for k, _ in kept}
        defaults = [*AZURE_FILES_DEFAULTS, ("uid", str(uid)), ("gid", str(gid))]
        kept += [(k, v) for k, v in defaults if k not in keys and f"no{k}" not in keys]
        text = None
        if credentials and not has_own_file:
            if credentials_file is None:
                raise ValueError("a cifs volume with credentials needs a credentials_file")
            text = "\n".join(credentials) + "\n"
            kept.append(("credentials", str(credentials_file)))
        argv = [mount_binary, "-t", spec.fstype, "-o", join_options(kept), spec.path,
                str(target)]
        return MountPlan(argv, text)
    if spec.fstype == "bind":
        opts = join_options([("bind", None), *[(k, v) for k, v in options if k != "bind"]])
        return MountPlan([mount_binary, "-o", opts, spec.path, str(target)], None)
    argv = [mount_binary, "-t", spec.fstype]
    if options:
        argv += ["-o", join_options(options)]
    return MountPlan([*argv, spec.path, str(target)], None)


# -- stale mounts and unmounting (also used by the agent for its FUSE mount) -----------

def _probe(path: str) -> int | None:
    """The stale errno of ``path``, or None if it answers (or is not stale-broken)."""
    try:
        os.stat(path)
        return None
    except OSError as exc:
        if exc.errno not in STALE_ERRNOS:
            return None
        first = exc.errno
    try:  # confirm: a one-entry readdir must fail the same way
        with os.scandir(path) as entries:
            next(entries, None)
        return None
    except OSError as exc:
        return exc.errno if exc.errno in STALE_ERRNOS else first


def stale_errno(path: str | os.PathLike[str], timeout: float = 10.0) -> int | None:
    """Like :func:`is_stale` but says why: the errno, ``ETIMEDOUT`` if hung, else None."""
    result: list[int | None] = []
    worker = threading.Thread(target=lambda: result.append(_probe(os.fspath(path))),
                              name="azfs-stale-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    if not result:  # the probe hangs in the kernel: the server is unreachable
        return errno.ETIMEDOUT
    return result[0]


def is_stale(path: str | os.PathLike[str], timeout: float = 10.0) -> bool:
    """True if the mount at ``path`` is dead (ENOTCONN/ESTALE/EIO/EHOSTDOWN) or hangs.

    Blocking (at most ``timeout``); from trio, call it via ``trio.to_thread``.
    """
    return stale_errno(path, timeout) is not None


_libc = ctypes.CDLL(None, use_errno=True)


def _umount2(path: str, flags: int) -> int:
    """0, or the errno of umount2(2)."""
    if _libc.umount2(os.fsencode(path), flags) == 0:
        return 0
    return ctypes.get_errno()


def lazy_unmount(path: str | os.PathLike[str]) -> None:
    """Detaches the mount at ``path`` now (``umount -l``); a no-op if nothing is mounted.

    Works on dead FUSE mounts too.  Stacked mounts are all detached.
    """
    target = os.path.abspath(path)
    for _ in range(16):
        if not mountinfo.is_mounted(target):
            return
        err = _umount2(target, MNT_DETACH)
        if err in (errno.EINVAL, errno.ENOENT):
            return
        if err == errno.EPERM and shutil.which("fusermount3"):
            subprocess.run(["fusermount3", "-u", "-z", target], capture_output=True,
                           env=dict(_SAFE_ENV), timeout=30, check=False)
        elif err:
            raise MountError(f"cannot unmount {target}: {os.strerror(err)}")
    raise MountError(f"cannot unmount {target}: still mounted")


def unmount(path: str | os.PathLike[str], timeout: float = 30.0) -> None:
    """Unmounts ``path``; falls back to a lazy unmount if busy or hung."""
    target = os.path.abspath(path)
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(_umount2(target, 0)),
                              name="azfs-umount", daemon=True)
    worker.start()
    worker.join(timeout)
    if result and result[0] in (0, errno.EINVAL, errno.ENOENT) \
            and not mountinfo.is_mounted(target):
        return
    if result and result[0] not in (0, errno.EBUSY, errno.EINVAL, errno.ENOENT) \
            and result[0] not in STALE_ERRNOS:
        raise MountError(f"cannot unmount {target}: {os.strerror(result[0])}")
    lazy_unmount(target)


# -- the refcounted mounter ----------------------------------------------------------------

class HostMounter:
    """Mounts volumes under ``state_dir/volumes`` for as long as someone uses them."""

    def __init__(self, state_dir: Path, uid: int = 1000, gid: int = 1000, *,
                 run_mount: MountRunner | None = None, mount_binary: str = "mount",
                 mount_timeout: float = 60.0, probe_timeout: float = 10.0,
                 max_parallel: int = 4) -> None:
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.state_dir = state_dir.resolve()
        self.volumes_dir = self.state_dir / "volumes"
        self.credentials_dir = self.state_dir / "credentials"
        self.uid, self.gid = uid, gid
        self.run_mount = run_mount or run_mount_command
        self.mount_binary = mount_binary
        self.mount_timeout = mount_timeout
        self.probe_timeout = probe_timeout
        self._limiter = trio.CapacityLimiter(max_parallel)
        self._locks: dict[str, trio.Lock] = {}
        self._refs: dict[str, int] = {}
        self._startup: set[str] = set()
        self._mounted: dict[str, Volume] = {}

    def path_for(self, volume_name: str) -> Path:
        return self.volumes_dir / validate_name(volume_name)

    def mounts(self) -> dict[str, tuple[Path, int]]:
        """Volumes this mounter holds mounted: name → (path, refcount)."""
        return {name: (self.path_for(name), self._refs.get(name, 0))
                for name in sorted(self._mounted)}

    def _lock(self, name: str) -> trio.Lock:
        return self._locks.setdefault(name, trio.Lock())

    async def _thread(self, fn: Callable[..., object], *args: object) -> object:
        return await trio.to_thread.run_sync(functools.partial(fn, *args),
                                             limiter=self._limiter)

    async def acquire(self, volume: Volume) -> Path:
        """Mounts ``volume`` if needed and takes a reference; returns its mount path."""
        path = self.path_for(volume.name)
        async with self._lock(volume.name):
            await self._ensure_mounted(volume, path)
            self._refs[volume.name] = self._refs.get(volume.name, 0) + 1
        return path

    async def release(self, volume: Volume) -> None:
        """Drops a reference; unmounts at zero unless the volume is a startup volume."""
        name = volume.name
        path = self.path_for(name)
        async with self._lock(name):
            refs = self._refs.get(name, 0)
            if refs <= 0:
                log.warning("release of volume %r that is not acquired; ignored", name)
                return
            self._refs[name] = refs - 1
            if refs - 1 > 0 or name in self._startup or volume.mount.at == "startup":
                return
            del self._refs[name]
            await self._unmount(name, path)

    async def mount_startup(self, volumes: Iterable[Volume]) -> dict[str, MountError]:
        """Mounts every ``startup`` volume (kept until :meth:`release_all`).

        Mounts all it can and returns the failures by name (also logged), so
        that one unreachable share does not keep a node from starting.
        """
        failures: dict[str, MountError] = {}

        async def one(volume: Volume) -> None:
            async with self._lock(volume.name):
                try:
                    await self._ensure_mounted(volume, self.path_for(volume.name))
                except MountError as exc:
                    log.error("%s", exc)
                    failures[volume.name] = exc
                    return
                self._startup.add(volume.name)

        async with trio.open_nursery() as nursery:
            for volume in volumes:
                if volume.mount.at == "startup":
                    nursery.start_soon(one, volume)
        return failures

    async def release_all(self) -> None:
        """Unmounts everything this mounter mounted (startup volumes included).

        Tries every volume; raises the first failure afterwards.
        """
        failures: list[MountError] = []
        for name in list(self._mounted):
            async with self._lock(name):
                self._refs.pop(name, None)
                self._startup.discard(name)
                if name in self._mounted:
                    try:
                        await self._unmount(name, self.path_for(name))
                    except MountError as exc:
                        log.error("%s", exc)
                        failures.append(exc)
        if failures:
            raise failures[0]

    # -- internals -----------------------------------------------------------------

    async def _ensure_mounted(self, volume: Volume, path: Path) -> None:
        state = await self._thread(self._state, path)
        if state == "ok":
            self._mounted.setdefault(volume.name, volume)
            return
        if state == "stale":
            log.warning("volume %r: stale mount at %s; unmounting lazily and remounting",
                        volume.name, path)
            await self._thread(lazy_unmount, path)
        await self._thread(self._mount, volume, path)
        self._mounted[volume.name] = volume

    def _state(self, path: Path) -> str:
        if not mountinfo.is_mounted(path):
            return "absent"
        return "stale" if is_stale(path, self.probe_timeout) else "ok"

    def _mount(self, volume: Volume, path: Path) -> None:
        if volume.mount.fstype == "bind" and not os.path.isdir(volume.mount.path):
            raise MountError(f"cannot mount volume {volume.name!r}: bind source "
                             f"{volume.mount.path} is not a directory")
        try:  # only root may reach the vfolders on a mounted volume
            ensure_private_dir(self.volumes_dir, "volume mount directory")
        except UserError as exc:
            raise MountError(f"cannot mount volume {volume.name!r}: {exc}") from None
        credentials_file: Path | None = None
        try:
            if volume.mount.fstype in CIFS_FSTYPES:
                credentials_file = self._new_credentials_file(volume.name)
            plan = plan_mount(volume, path, self.uid, self.gid, credentials_file,
                              self.mount_binary)
            path.mkdir(exist_ok=True, mode=0o700)
            if credentials_file is not None and plan.credentials is not None:
                with open(credentials_file, "w") as out:
                    out.write(plan.credentials)
            log.info("volume %r: %s", volume.name, " ".join(plan.argv))
            result = self.run_mount(plan.argv, self.mount_timeout)
        except OSError as exc:
            self._cleanup_failed(path)
            raise MountError(f"cannot mount volume {volume.name!r}: "
                             f"{exc.filename or path}: {exc.strerror}") from None
        except BaseException:
            self._cleanup_failed(path)
            raise
        finally:
            if credentials_file is not None:
                with contextlib.suppress(FileNotFoundError):
                    credentials_file.unlink()
        if result.returncode == 0 and mountinfo.is_mounted(path):
            return
        self._cleanup_failed(path)
        message = result.output or f"mount exited with status {result.returncode}"
        if result.returncode == 0:
            message = f"mount reported success but nothing is mounted at {path}"
        raise MountError(f"cannot mount volume {volume.name!r} ({volume.mount.fstype} "
                         f"{volume.mount.path}): {_scrub(message, volume)}")

    def _new_credentials_file(self, name: str) -> Path:
        self.credentials_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.credentials_dir, 0o700)
        fd, file = tempfile.mkstemp(prefix=f"{name}.", dir=self.credentials_dir)  # mode 0600
        os.close(fd)
        return Path(file)

    def _cleanup_failed(self, path: Path) -> None:
        with contextlib.suppress(MountError):
            lazy_unmount(path)
        with contextlib.suppress(OSError):
            path.rmdir()

    async def _unmount(self, name: str, path: Path) -> None:
        try:
            await self._thread(unmount, path)
        except MountError as exc:
            raise MountError(f"volume {name!r}: {exc}") from None
        self._mounted.pop(name, None)
        with contextlib.suppress(OSError):
            path.rmdir()
        log.info("volume %r: unmounted %s", name, path)


def _scrub(message: str, volume: Volume) -> str:
    if volume.mount.password is not None and volume.mount.password.reveal():
        message = message.replace(volume.mount.password.reveal(), "***")
    return redact(message)
