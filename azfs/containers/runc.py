"""Runs kernels as real OCI containers with ``runc``.

Two halves: :func:`oci_config` / :func:`write_bundle` turn a
:class:`~azfs.containers.spec.KernelSpec` into an OCI bundle (``config.json``
per the runtime spec, rootfs referenced by absolute path so one rootfs
serves many kernels), and :class:`Runc` drives the ``runc`` binary: one-shot
:meth:`Runc.run`, or :meth:`Runc.start` / :meth:`Runc.exec` /
:meth:`Runc.kill` / :meth:`Runc.delete` for long-running kernels.

Choices that work on a node with cgroup v1 or v2 and no systemd:
* no ``cgroupsPath``: runc makes ``<container-id>`` under its own cgroup in
  every hierarchy and removes it on delete (``--systemd-cgroup`` is never
  passed);
* state under ``--root`` (default: runc's own ``/run/runc``), so a test or a
  second agent can keep its containers apart;
* network ``none`` = a network namespace of its own (loopback only), or
  ``host`` = no network namespace.

runc's own diagnostics go to a JSON log file in the bundle, so a failure of
runc is told apart from the kernel's process exiting non-zero; the former
raises :class:`ContainerError` quoting runc.  Teardown is always
``runc delete --force``, which kills whatever is left and removes the
container's state and cgroups.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal as signals
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from azfs.containers.spec import DEFAULT_PATH, KernelSpec, Network, check_sources
from azfs.errors import AzfsError, InvalidArgument
from azfs.export import CONTAINER_HOME, ExportResponse

OCI_VERSION = "1.0.2"
CAPABILITIES = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
MASKED_PATHS = ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/sys/firmware", "/proc/scsi"]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
RUNC_LOG = "runc.log"


class ContainerError(AzfsError):
    """runc could not create, run or remove a container; carries runc's message."""


@dataclass(frozen=True)
class RunResult:
    """What a one-shot process left: exit code (128+N if killed by signal N) and output."""

    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def _system_mounts(readonly_rootfs: bool) -> list[dict[str, Any]]:
    """The standard /proc, /dev, /sys mounts of a runc container."""
    return [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
    ] + ([{"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
           "options": ["nosuid", "nodev", "mode=1777", "size=65536k"]}]
         if readonly_rootfs else [])


def _process(uid: int, gid: int, args: list[str], env: list[str], cwd: str
             ) -> dict[str, Any]:
    """An OCI ``process``: no terminal, few capabilities, no privilege gain."""
    caps = list(CAPABILITIES)
    return {
        "terminal": False,
        "user": {"uid": uid, "gid": gid},
        "args": args,
        "env": env,
        "cwd": cwd,
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps,
                         "ambient": caps if uid == 0 else []},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": True,
    }


def oci_config(spec: KernelSpec, rootfs: str | Path) -> dict[str, Any]:
    """The OCI runtime ``config.json`` for ``spec`` on ``rootfs`` (absolute path)."""
    rootfs = Path(rootfs)
    if not rootfs.is_absolute():
        raise InvalidArgument("rootfs must be an absolute path")
    mounts = _system_mounts(spec.readonly_rootfs)
    for bind in spec.ordered_binds():
        mounts.append({"destination": bind.destination, "type": "bind",
                       "source": str(bind.source),
                       "options": ["rbind", "ro" if bind.readonly else "rw", "nosuid",
                                   "nodev", *([bind.propagation] if bind.propagation else [])]})
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if spec.network == "none":
        namespaces.append({"type": "network"})
    return {
        "ociVersion": OCI_VERSION,
        "process": _process(spec.uid, spec.gid, list(spec.args), spec.environment(), spec.cwd),
        "root": {"path": str(rootfs), "readonly": spec.readonly_rootfs},
        "hostname": spec.kernel_id[:63],
        "mounts": mounts,
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": namespaces,
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
        },
    }


def write_bundle(spec: KernelSpec, rootfs: str | Path, bundle: str | Path) -> Path:
    """Writes ``bundle/config.json`` after checking the rootfs and every bind source."""
    rootfs, bundle = Path(rootfs).absolute(), Path(bundle).absolute()
    if not (rootfs / "bin").is_dir():
        raise InvalidArgument(f"rootfs {rootfs} does not look like a root filesystem")
    check_sources(spec.ordered_binds())
    config = oci_config(spec, rootfs)
    bundle.mkdir(parents=True, exist_ok=True)
    tmp = bundle / "config.json.tmp"
    tmp.unlink(missing_ok=True)
    # the process environment may hold credentials: readable by root only
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        json.dump(config, f, indent=2)
    tmp.replace(bundle / "config.json")
    return bundle


def _runc_message(log: Path, stderr: str) -> str:
    """The error lines of runc's JSON log, else its stderr."""
    messages: list[str] = []
    with contextlib.suppress(OSError):
        for line in log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("level") in ("error", "fatal"):
                    messages.append(str(entry.get("msg", "")))
    return "; ".join(messages) or stderr.strip() or "no message"


def _log_errors(log: Path) -> bool:
    return _runc_message(log, "") != "no message"


class Runc:
    """A ``runc`` binary with one state directory."""

    def __init__(self, root: str | Path | None = None, binary: str = "runc") -> None:
        found = shutil.which(binary)
        if found is None:
            raise ContainerError(f"{binary} not found (install the Debian package runc)")
        self.binary = found
        self.root = Path(root) if root is not None else None

    def _base(self, log: Path | None = None) -> list[str]:
        cmd = [self.binary]
        if self.root is not None:
            cmd += ["--root", str(self.root)]
        if log is not None:
            cmd += ["--log", str(log), "--log-format", "json"]
        return cmd

    def _call(self, args: Sequence[str], what: str, timeout: float = 30.0,
              ok_missing: bool = False) -> str:
        """Runs a runc management command; raises ContainerError with runc's stderr."""
        try:
            done = subprocess.run(self._base() + list(args), capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise ContainerError(f"runc {what} timed out after {timeout}s") from None
        if done.returncode != 0:
            message = done.stderr.strip() or done.stdout.strip()
            if ok_missing and "does not exist" in message:
                return ""
            raise ContainerError(f"runc {what} failed: {message}")
        return done.stdout

    # --- one-shot -------------------------------------------------------------------

    def run(self, bundle: str | Path, container_id: str, *, timeout: float = 60.0,
            stdin: bytes | None = None) -> RunResult:
        """Runs the bundle's process to completion and always removes the container."""
        bundle = Path(bundle)
        log = bundle / RUNC_LOG
        log.unlink(missing_ok=True)
        cmd = self._base(log) + ["run", "--bundle", str(bundle), container_id]
        try:
            done = subprocess.run(cmd, capture_output=True, input=stdin,
                                  stdin=None if stdin is not None else subprocess.DEVNULL,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            self.delete(container_id)
            raise ContainerError(
                f"container {container_id} did not finish within {timeout}s") from None
        except BaseException:
            self.delete(container_id)
            raise
        stdout = done.stdout.decode(errors="replace")
        stderr = done.stderr.decode(errors="replace")
        if _log_errors(log):
            message = _runc_message(log, stderr)
            if "already exists" not in message:  # never remove a container we did not make
                self.delete(container_id)
            raise ContainerError(f"runc could not run {container_id}: {message}")
        self.delete(container_id)
        return RunResult(done.returncode, stdout, stderr)

    # --- long-running ---------------------------------------------------------------

    def start(self, bundle: str | Path, container_id: str, *, timeout: float = 30.0) -> None:
        """Starts the bundle's process detached; its output goes to files in the bundle."""
        bundle = Path(bundle)
        log = bundle / RUNC_LOG
        log.unlink(missing_ok=True)
        cmd = self._base(log) + ["run", "--detach", "--bundle", str(bundle), container_id]
        try:
            with open(bundle / "stdout.log", "ab") as out, \
                    open(bundle / "stderr.log", "ab") as err:
                done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                      timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            self.delete(container_id)
            raise ContainerError(f"runc did not start {container_id} within {timeout}s") \
                from None
        if done.returncode != 0:
            message = _runc_message(log, (bundle / "stderr.log").read_text(errors="replace"))
            if "already exists" not in message:
                self.delete(container_id)
            raise ContainerError(f"runc could not start {container_id}: {message}")

    def exec(self, container_id: str, args: Sequence[str], *, uid: int = 1000,
             gid: int = 1000, cwd: str = CONTAINER_HOME,
             env: Mapping[str, str] | None = None, timeout: float = 60.0) -> RunResult:
        """Runs one more process in a running container and returns its result."""
        if not args:
            raise InvalidArgument("args must not be empty")
        merged = {"PATH": DEFAULT_PATH, "HOME": CONTAINER_HOME, **(env or {})}
        if any(not k or "=" in k or "\0" in k + v for k, v in merged.items()):
            raise InvalidArgument("bad environment variable name or value")
        env_list = [f"{k}={v}" for k, v in merged.items()]
        with tempfile.TemporaryDirectory(prefix="azfs-exec-") as tmp:
            log = Path(tmp) / RUNC_LOG
            # a process file, not --env flags: values never show in the process list
            process = Path(tmp) / "process.json"
            with os.fdopen(os.open(process, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
                           "w") as f:
                json.dump(_process(uid, gid, list(args), env_list, cwd), f)
            cmd = self._base(log) + ["exec", "--process", str(process), container_id]
            try:
                done = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL,
                                      timeout=timeout, check=False)
            except subprocess.TimeoutExpired:
                raise ContainerError(
                    f"exec in {container_id} did not finish within {timeout}s") from None
            stderr = done.stderr.decode(errors="replace")
            if _log_errors(log):
                raise ContainerError(
                    f"runc exec in {container_id} failed: {_runc_message(log, stderr)}")
        return RunResult(done.returncode, done.stdout.decode(errors="replace"), stderr)

    def kill(self, container_id: str, signal: int = signals.SIGTERM) -> None:
        """Sends ``signal`` to the container's init process."""
        self._call(["kill", container_id, str(int(signal))], f"kill {container_id}")

    def delete(self, container_id: str) -> None:
        """``runc delete --force``: kills what is left, removes state and cgroups.

        A container that does not exist (already deleted) is not an error.
        """
        self._call(["delete", "--force", container_id], f"delete {container_id}",
                   ok_missing=True)

    def state(self, container_id: str) -> dict[str, Any]:
        """runc's state of one container (``status``: created, running, stopped)."""
        return json.loads(self._call(["state", container_id], f"state {container_id}"))

    def list(self) -> list[dict[str, Any]]:
        """All containers under this state root."""
        out = self._call(["list", "--format", "json"], "list").strip()
        return json.loads(out) if out and out != "null" else []

    @contextlib.contextmanager
    def running(self, bundle: str | Path, container_id: str) -> Iterator[str]:
        """Starts a long-running container and always deletes it on exit."""
        self.start(bundle, container_id)
        try:
            yield container_id
        finally:
            self.delete(container_id)


def prepare_scratch(scratch_dir: str | Path, uid: int, gid: int) -> Path:
    """Creates the kernel's scratch home (if missing) owned by the kernel's user."""
    scratch = Path(scratch_dir).absolute()
    if not scratch.exists():
        scratch.mkdir(parents=True, mode=0o755)
        os.chown(scratch, uid, gid)
    elif not scratch.is_dir():
        raise InvalidArgument(f"scratch dir {scratch} is not a directory")
    return scratch


class KernelContainer:
    """A long-running kernel container made from an export; ``stop()`` removes it.

    Usable as a context manager, which always stops the container.
    """

    def __init__(self, rootfs: str | Path, export: ExportResponse, args: Sequence[str], *,
                 bundle_dir: str | Path, scratch_dir: str | Path | None = None,
                 uid: int = 1000, gid: int = 1000, env: Mapping[str, str] | None = None,
                 network: Network = "none", readonly_rootfs: bool = False,
                 runc: Runc | None = None) -> None:
        home = next((Path(m.source) for m in export.mounts if m.destination == CONTAINER_HOME),
                    None)
        scratch = None
        if home is None and scratch_dir is not None:
            scratch = prepare_scratch(scratch_dir, uid, gid)
        self.spec = KernelSpec.from_export(export, args, uid=uid, gid=gid,
                                           scratch_dir=scratch, env=env, network=network,
                                           readonly_rootfs=readonly_rootfs)
        self.id = self.spec.kernel_id
        #: the host directory the kernel sees as /home/work (None: the rootfs' own)
        self.scratch = home or scratch
        self.runc = runc or Runc()
        self.bundle = write_bundle(self.spec, rootfs, bundle_dir)
        self.runc.start(self.bundle, self.id)

    def exec(self, args: Sequence[str], timeout: float = 60.0) -> RunResult:
        """Runs ``args`` in the kernel as its user, in /home/work."""
        return self.runc.exec(self.id, args, uid=self.spec.uid, gid=self.spec.gid,
                              cwd=self.spec.cwd, env=self.spec.env, timeout=timeout)

    def sh(self, script: str, timeout: float = 60.0) -> RunResult:
        return self.exec(["sh", "-c", script], timeout=timeout)

    def status(self) -> str:
        """runc's status: ``running``, ``stopped``, ... or ``absent``."""
        try:
            return str(self.runc.state(self.id)["status"])
        except ContainerError as exc:
            if "does not exist" in str(exc):
                return "absent"
            raise

    def stop(self) -> None:
        self.runc.delete(self.id)

    def __enter__(self) -> KernelContainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_kernel(rootfs: str | Path, export: ExportResponse, args: Sequence[str], *,
               uid: int = 1000, gid: int = 1000, scratch_dir: str | Path,
               env: Mapping[str, str] | None = None, network: Network = "none",
               readonly_rootfs: bool = False, runc_root: str | Path | None = None,
               timeout: float = 60.0) -> RunResult:
    """Runs ``args`` once as a kernel container with the export's binds under /home/work."""
    scratch = prepare_scratch(scratch_dir, uid, gid)
    spec = KernelSpec.from_export(export, args, uid=uid, gid=gid, scratch_dir=scratch,
                                  env=env, network=network, readonly_rootfs=readonly_rootfs)
    runtime = Runc(runc_root)
    with tempfile.TemporaryDirectory(prefix=f"azfs-bundle-{spec.kernel_id[:32]}-") as tmp:
        bundle = write_bundle(spec, rootfs, tmp)
        return runtime.run(bundle, spec.kernel_id, timeout=timeout)
