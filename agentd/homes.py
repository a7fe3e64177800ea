"""Kernel homes: the host-side directory each kernel sees as ``/home/work``.

A bind made from a FUSE mount dies with the process serving it, and the
kernel cannot repair it inside a running container.  So a container never
binds a FUSE view directly: it binds its kernel's home, ``<state>/homes/<id>``,
with ``rslave`` propagation, and every vfolder (and startup volume) is a
mount *inside* that home, placed by the agent.  The home is a mount point of
its own with shared propagation, so whatever the agent mounts or unmounts
below it later reaches the running container: a dead view's bind is
replaced after a fusehost restart, a vfolder is attached to or detached
from a running kernel.  Files a kernel writes outside its vfolders stay in
its home (its scratch space) and are deleted with it.

Invariants:
* ``<state>/homes`` is a private mount (bound onto itself), so the homes'
  mounts never propagate anywhere but into their kernels' containers;
* a bind is made detached, gets nosuid/nodev (and ``ro``) and only then is
  attached (:mod:`agentd.mountcalls`), so no copy of it is ever writable
  when it should not be;
* a replacement goes *beneath* the old bind before that is detached, so the
  container never sees the bare directory; where the kernel does not support
  that, the bare directory is root-owned and read-only, so a write in the
  gap fails instead of landing in the scratch space;
* a home's tree is deleted only when nothing is mounted below it.

Blocking: call through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from agentd import mountcalls
from azfs.volumes.mountinfo import MountEntry, read_mountinfo

log = logging.getLogger("agentd.homes")

HOMES = "homes"


class HomeError(OSError):
    """A kernel home or one of its binds could not be set up or removed."""


@dataclass(frozen=True)
class Bind:
    """One mount inside a kernel home: ``source`` at ``home/rel``."""

    rel: str
    source: str
    read_only: bool

    @classmethod
    def from_record(cls, data: dict) -> Bind:
        return cls(rel=str(data["rel"]), source=str(data["source"]),
                   read_only=bool(data["read_only"]))

    def record(self) -> dict:
        return {"rel": self.rel, "source": self.source, "read_only": self.read_only}


class KernelHomes:
    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / HOMES

    def path(self, kernel_id: str) -> Path:
        return self.root / kernel_id

    # ---- setup -----------------------------------------------------------------------
    def ensure_root(self) -> None:
        """``<state>/homes``: root-only, a private mount of its own."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        if not _is_mount_point(self.root, read_mountinfo()):
            _call(mountcalls.bind_onto_itself, self.root)
        _call(mountcalls.set_propagation, self.root, shared=False)

    def prepare(self, kernel_id: str, uid: int, gid: int) -> Path:
        """The kernel's home: owned by its user, a mount point with shared propagation."""
        self.ensure_root()
        home = self.path(kernel_id)
        try:
            home.mkdir(mode=0o755)
            os.chown(home, uid, gid)
        except FileExistsError:
            pass
        if not _is_mount_point(home, read_mountinfo()):
            _call(mountcalls.bind_onto_itself, home)
        _call(mountcalls.set_propagation, home, shared=True)
        return home

    def place(self, kernel_id: str, bind: Bind) -> None:
        """Mounts ``bind`` in the home; a bind already there is replaced without a gap."""
        home = self.path(kernel_id)
        target = home / bind.rel
        if not _top_at(home, read_mountinfo()):
            raise HomeError(errno.ENOENT, f"{home}: the kernel home is not mounted")
        fd = _open_target(home, bind.rel)
        try:
            if not _top_at(target, read_mountinfo()):
                _call(_attach_fresh, bind, fd, beneath=False)
                return
            try:
                _attach_fresh(bind, fd, beneath=True)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise HomeError(exc.errno, f"{target}: {exc.strerror}") from None
                # no mount-beneath here: detach first (a write in the gap gets EACCES)
                log.info("%s: replacing the bind with a short gap (%s)", target, exc.strerror)
                os.close(fd)
                fd = -1
                self._detach_all(home, bind.rel)
                fd = _open_target(home, bind.rel)
                _call(_attach_fresh, bind, fd, beneath=False)
                return
            _call(mountcalls.detach, f"/proc/self/fd/{fd}", follow=True)  # the old, on top
        finally:
            if fd >= 0:
                os.close(fd)

    def remove(self, kernel_id: str, rel: str) -> None:
        """Unmounts ``home/rel`` (it disappears from the container) and removes its directory."""
        home = self.path(kernel_id)
        self._detach_all(home, rel)
        try:
            fd = _open_target(home, str(Path(rel).parent), create=False) \
                if "/" in rel else os.open(home, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except HomeError:
            return
        try:
            os.rmdir(Path(rel).name, dir_fd=fd)
        except OSError:
            pass  # not empty or gone: harmless, the home is deleted with the kernel
        finally:
            os.close(fd)

    def destroy(self, kernel_id: str) -> None:
        """Unmounts everything in the home and the home itself, then deletes its tree."""
        home = self.path(kernel_id)
        for entry in sorted(self._under(home, read_mountinfo()),
                            key=lambda e: -len(e.mount_point)):
            self._detach_all(home, str(Path(entry.mount_point).relative_to(home)))
        _detach_path(home)
        if self._under(home, read_mountinfo()) or _is_mount_point(home, read_mountinfo()):
            raise HomeError(errno.EBUSY, f"{home}: still mounted; not deleting it")
        shutil.rmtree(home, ignore_errors=not home.exists())

    def teardown(self) -> None:
        """Destroys every home and unmounts the homes directory (agent decommissioning)."""
        for kernel_id in self.on_disk():
            self.destroy(kernel_id)
        _detach_path(self.root)

    # ---- observation -------------------------------------------------------------------
    def on_disk(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []

    def states(self, kernel_id: str, binds: list[Bind], devices: dict[str, str],
               table: list[MountEntry] | None = None) -> dict[str, str]:
        """Per bind: ``live``, ``dead`` (another filesystem than its source's) or ``missing``.

        ``devices`` maps a source prefix to the ``major:minor`` its binds must
        show (the FUSE mount, a volume mount): a bind of a dead fusehost's mount
        shows the old one.  Reads only the mount table, never the binds
        themselves, so a hung mount cannot hang the check.
        """
        table = read_mountinfo() if table is None else table
        home = self.path(kernel_id)
        out = {}
        for bind in binds:
            top = _top_at(home / bind.rel, table)
            if top is None or not _is_mount_point(home, table):
                out[bind.rel] = "missing"
                continue
            want = next((dev for prefix, dev in devices.items()
                         if _below(bind.source, prefix)), None)
            out[bind.rel] = "live" if want is None or top.device == want else "dead"
        return out

    def _under(self, home: Path, table: list[MountEntry]) -> list[MountEntry]:
        return [e for e in table if _below(e.mount_point, home)
                and Path(e.mount_point) != home]

    def _detach_all(self, home: Path, rel: str) -> None:
        """Unmounts every mount stacked at ``home/rel``, reached without symlinks."""
        target = home / rel
        for _ in range(64):  # stacked mounts: each detach takes the top one
            if not _top_at(target, read_mountinfo()):
                return
            fd = _open_target(home, rel, create=False)
            try:
                if not _call(mountcalls.detach, f"/proc/self/fd/{fd}", follow=True):
                    return
            finally:
                os.close(fd)
        raise HomeError(errno.EBUSY, f"{target}: still mounted")


def _detach_path(target: Path) -> None:
    """Unmounts every mount stacked at ``target``, a path of the agent's own (no symlink
    of a kernel's on the way: the kernel's binds are detached first)."""
    for _ in range(64):
        if not _top_at(target, read_mountinfo()):
            return
        if not _call(mountcalls.detach, target):
            return
    raise HomeError(errno.EBUSY, f"{target}: still mounted")


def _attach_fresh(bind: Bind, fd: int, beneath: bool, tries: int = 40) -> None:
    """:func:`mountcalls.attach_bind`, again on ``ENOENT``: a view attached a moment ago
    has its name invalidated by the fusehost asynchronously, and a bind cloned from the
    name's old dentry just before that cannot be attached; a new lookup finds it."""
    for attempt in range(tries):
        try:
            mountcalls.attach_bind(bind.source, fd, read_only=bind.read_only, beneath=beneath)
            return
        except FileNotFoundError:
            if attempt == tries - 1:
                raise
            time.sleep(0.025)


def _call(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    try:
        return fn(*args, **kwargs)
    except OSError as exc:
        raise HomeError(exc.errno or errno.EIO,
                        f"{exc.filename or args[-1]}: {exc.strerror}") from None


def _below(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """``path`` is ``root`` or under it, compared as absolute names: never a ``stat`` (or
    ``realpath``), which would wait on a hung mount, maybe one that is not the agent's."""
    p, r = os.path.abspath(path), os.path.abspath(root).rstrip("/")
    return p == r or p.startswith(r + "/")


def _top_at(path: Path, table: list[MountEntry]) -> MountEntry | None:
    target = os.path.abspath(path)
    found = [e for e in table if e.mount_point == target]
    return found[-1] if found else None


def _is_mount_point(path: Path, table: list[MountEntry]) -> bool:
    return _top_at(path, table) is not None


def _open_target(home: Path, rel: str, create: bool = True) -> int:
    """An ``O_PATH`` descriptor of directory ``home/rel``, each component opened without
    following symlinks (the home belongs to the kernel's user, who could plant one);
    missing components are created root-owned and read-only (``create``)."""
    parts = [p for p in rel.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise HomeError(errno.EINVAL, f"{rel!r} is not a path inside the kernel home")
    flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(home, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            if create:
                try:
                    os.mkdir(part, 0o555, dir_fd=fd)
                except FileExistsError:
                    pass
            try:
                nfd = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                raise HomeError(exc.errno, f"{home / rel}: {part!r}: {exc.strerror} "
                                "(symlinks are not followed)") from None
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd
