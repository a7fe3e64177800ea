"""``azfs mount``, ``azfs umount`` and ``azfs usage``: one vfolder, mounted for use or inspection.

Without ``--foreground`` the command starts the daemon as a child in its own
session and returns only once the mount is ready (or with the daemon's error),
so scripts can use the mountpoint as soon as the command succeeds.
Everything is validated before anything is mounted.

An inspection mount is the mounting user's alone (no ``allow_other``): other
users of the host, whatever their uid, get ``EACCES``.  ``--allow-other``
opens it to them, with the permissions the mount presents (``--uid``/``--gid``).
"""

from __future__ import annotations

import argparse
import errno
import functools
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from azfs.errors import AzfsError, UserError
from azfs.units import parse_size
from azfs.volumes.mountinfo import find_mount, is_within

log = logging.getLogger("azfs.mount")

RUN_DIR = Path(os.environ.get("AZFS_RUN_DIR", "/run/azfs"))
DEFAULT_LOG = "/var/log/azfs/mount.log"
UMOUNT_WAIT = 30.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mount", help="mount one vfolder (a directory or a blob dataset URL)",
                       description="Mount SOURCE (a directory on a host volume, or a blob "
                                   "container/prefix URL with a SAS) at MOUNTPOINT.")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--ro", action="store_true", help="read-only: every write fails with EROFS")
    p.add_argument("--uid", type=_id, help="show every file as owned by this uid")
    p.add_argument("--gid", type=_id, help="show every file as owned by this gid")
    p.add_argument("--quota-bytes", type=parse_size, default=0, metavar="N",
                   help="byte quota (suffixes K, M, G, T; 0 = none)")
    p.add_argument("--quota-files", type=_count, default=0, metavar="N",
                   help="file count quota (0 = none)")
    p.add_argument("--cache-timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="kernel entry/attribute cache timeout")
    p.add_argument("--sas-file", type=Path, help="blob sources: file holding the SAS, re-read "
                   "when the SAS nears expiry")
    p.add_argument("--listing-ttl", type=_seconds, default=None, metavar="SECONDS",
                   help="blob sources: how long listings (and the kernel's entries) are "
                        "trusted before the dataset is listed again (default 60; "
                        "'azfs dataset refresh' forgets them at once)")
    p.add_argument("--cache-dir", type=Path, help="blob sources: block cache directory")
    p.add_argument("--cache-bytes", type=parse_size, default=None,
                   help="blob sources: block cache size")
    p.add_argument("--io-threads", type=_threads, default=None, metavar="N",
                   help="directory sources: worker threads for the volume (default 32)")
    p.add_argument("--metadata-deadline", type=_deadline, default=None, metavar="SECONDS",
                   help="directory sources: longest a metadata call may take before it "
                        "fails with ETIMEDOUT (default 10)")
    p.add_argument("--data-deadline", type=_deadline, default=None, metavar="SECONDS",
                   help="directory sources: same for read, write, fsync (default 30)")
    p.add_argument("--io-mode", choices=("auto", "threads", "inline"), default=None,
                   help="directory sources: calls in worker threads, or inline on the event "
                        "loop (auto: inline only on a local filesystem)")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users of the host in (default: only the mounting user)")
    p.add_argument("--xattrs", action="store_true",
                   help="serve extended attributes (user.*); off by default: with them, "
                        "every write() and every file 'ls -l' shows costs extra requests")
    p.add_argument("--foreground", "-f", action="store_true",
                   help="stay in the foreground, logging to stderr")
    p.add_argument("--log-file", default=None,
                   help=f"daemon log in background mode (default {DEFAULT_LOG})")
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--sas-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="unmount an azfs mountpoint")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.add_argument("--lazy", "-z", action="store_true",
                   help="detach now even if busy; the daemon exits once files are closed")
    u.set_defaults(func=cmd_umount)

    s = sub.add_parser("usage", help="show a vfolder's usage (bytes, files) from its ledger")
    s.add_argument("source", metavar="DIRECTORY")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_usage)


def _id(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32 - 1:
        raise argparse.ArgumentTypeError("must be between 0 and 4294967294")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be between 0 and 3600 seconds")
    return value


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= value <= 1024:
        raise argparse.ArgumentTypeError("must be between 1 and 1024")
    return value


def _deadline(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def io_limits(args: argparse.Namespace):
    """The volume I/O settings of the mount's flags (defaults for the others)."""
    from azfs.volumes.io import IOLimits

    given = {name: getattr(args, opt) for name, opt in (
        ("threads", "io_threads"), ("metadata_deadline", "metadata_deadline"),
        ("data_deadline", "data_deadline"), ("mode", "io_mode")) if getattr(args, opt) is not None}
    return IOLimits(**given)


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def is_blob_source(source: str) -> bool:
    return source.startswith(("http://", "https://"))


# ---- validation ------------------------------------------------------------------
def check_mountpoint(mountpoint: str) -> Path:
    mp = Path(mountpoint)
    try:
        st = os.stat(mp)
    except FileNotFoundError:
        raise UserError(f"mountpoint {mp}: does not exist") from None
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO, errno.ESTALE):
            raise UserError(f"mountpoint {mp}: a dead mount is still there; "
                            f"run 'azfs umount --lazy {mp}'") from None
        raise UserError(f"mountpoint {mp}: {exc.strerror}") from None
    import stat as _stat
    if not _stat.S_ISDIR(st.st_mode):
        raise UserError(f"mountpoint {mp}: not a directory")
    if find_mount(mp.resolve()) is not None or os.path.ismount(mp):
        raise UserError(f"mountpoint {mp}: already in use by another mount")
    return mp.resolve()


def check_privileges() -> None:
    if os.geteuid() == 0:
        return
    try:
        with open("/etc/fuse.conf") as f:
            if any(line.strip() == "user_allow_other" for line in f):
                return
    except OSError:
        pass
    raise UserError("must run as root (containers need allow_other)")


def check_source(args: argparse.Namespace) -> None:
    if is_blob_source(args.source):
        if args.quota_bytes or args.quota_files:
            raise UserError("quotas apply to directory sources only")
        return
    src = Path(args.source)
    if not src.exists():
        raise UserError(f"source {src}: does not exist")
    if not src.is_dir():
        raise UserError(f"source {src}: not a directory")
    if is_within(args.mountpoint, src) or is_within(src, args.mountpoint):
        raise UserError("source and mountpoint must not contain each other")
    for opt in ("sas_file", "cache_dir", "cache_bytes", "listing_ttl"):
        if getattr(args, opt) is not None:
            raise UserError(f"--{opt.replace('_', '-')} applies to blob sources only")


# ---- mount -----------------------------------------------------------------------
def cmd_mount(args: argparse.Namespace) -> int:
    try:
        check_privileges()
        mountpoint = check_mountpoint(args.mountpoint)
        check_source(args)
    except UserError as exc:
        _report_ready(args.ready_fd, f"error: {exc}")
        raise
    if not args.foreground:
        return _spawn_background(args)
    return _run_foreground(args, mountpoint)


def _run_foreground(args: argparse.Namespace, mountpoint: Path) -> int:
    import trio

    from azfs.backends import open_backend
    from azfs.fs.daemon import raise_fd_limit, serve
    from azfs.fs.inodes import View
    from azfs.fs.operations import DEFAULT_CACHE_TIMEOUT, AzfsOperations
    from azfs.logs import setup_logging
    from azfs.usage import Quota

    setup_logging(logging.DEBUG if args.debug else logging.INFO)
    raise_fd_limit()
    if args.sas_fd is not None:
        # the SAS of a background daemon comes through a pipe, never its command line
        with os.fdopen(args.sas_fd, "rb") as pipe:
            args.source = f"{args.source}?{pipe.read().decode().strip()}"
    extra = {}
    if args.listing_ttl is not None:
        from azfs.backends.blob import BlobOptions

        extra["options"] = BlobOptions(listing_ttl=args.listing_ttl)
    try:
        backend = open_backend(args.source, quota=Quota(args.quota_bytes, args.quota_files),
                               read_only=args.ro,
                               sas_file=args.sas_file, cache_dir=args.cache_dir,
                               cache_bytes=args.cache_bytes, limits=io_limits(args), **extra)
    except AzfsError as exc:
        _report_ready(args.ready_fd, f"error: {exc}")
        raise
    view = View(label=os.path.basename(os.path.normpath(args.source)) or "vfolder",
                backend=backend, read_only=args.ro, uid=args.uid, gid=args.gid)
    timeout = args.cache_timeout if args.cache_timeout is not None else \
        backend.cache_timeout if backend.cache_timeout is not None else DEFAULT_CACHE_TIMEOUT
    ops = AzfsOperations(view, cache_timeout=timeout, xattrs=args.xattrs)
    pidfile = _pidfile(mountpoint)

    def ready() -> None:
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        pidfile.write_text(f"{os.getpid()}\n")
        _report_ready(args.ready_fd, "ok")

    tasks = []
    if is_blob_source(args.source):
        from azfs.blob import control

        # 'azfs dataset refresh' and the dataset's counters
        tasks.append(functools.partial(control.serve, control.DatasetControl(ops, backend),
                                       control.socket_path(pidfile)))
    try:
        trio.run(functools.partial(serve, ops, mountpoint, [backend], on_ready=ready,
                                   allow_other=args.allow_other, tasks=tasks))
    except (RuntimeError, AzfsError) as exc:
        msg = f"cannot mount {mountpoint}: {exc}"
        _report_ready(args.ready_fd, f"error: {msg}")
        raise UserError(msg) from None
    finally:
        pidfile.unlink(missing_ok=True)
    return 0


def _report_ready(fd: int | None, message: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, (message + "\n").encode())
        os.close(fd)
    except OSError:
        pass


def _spawn_background(args: argparse.Namespace) -> int:
    log_file = args.log_file or DEFAULT_LOG
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    read_end, write_end = os.pipe()
    argv = [sys.executable, "-m", "azfs.cli.main"]
    if args.debug:
        argv.append("--debug")
    argv += ["mount", "--foreground", "--ready-fd", str(write_end)]
    argv += _forwarded_options(args)
    source, _, sas = args.source.partition("?") if is_blob_source(args.source) else \
        (args.source, "", "")
    pass_fds = [write_end]
    sas_read = None
    if sas:
        sas_read, sas_write = os.pipe()
        os.write(sas_write, sas.encode())  # a SAS is far smaller than a pipe's buffer
        os.close(sas_write)
        argv += ["--sas-fd", str(sas_read)]
        pass_fds.append(sas_read)
    argv += ["--", source, args.mountpoint]
    with open(log_file, "ab") as log_out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_out, stderr=log_out,
                                pass_fds=pass_fds, start_new_session=True)
    os.close(write_end)
    if sas_read is not None:
        os.close(sas_read)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode(errors="replace").strip()
    if message == "ok":
        return 0
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
    if message.startswith("error: "):
        raise UserError(message[len("error: "):])
    raise UserError(f"mount daemon exited with status {proc.returncode}; see {log_file}")


def _forwarded_options(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    if args.ro:
        out.append("--ro")
    if args.allow_other:
        out.append("--allow-other")
    if args.xattrs:
        out.append("--xattrs")
    for opt in ("uid", "gid", "cache_timeout", "listing_ttl", "sas_file", "cache_dir",
                "cache_bytes", "io_threads", "metadata_deadline", "data_deadline", "io_mode"):
        value = getattr(args, opt)
        if value is not None:
            out += [f"--{opt.replace('_', '-')}", str(value)]
    if args.quota_bytes:
        out += ["--quota-bytes", str(args.quota_bytes)]
    if args.quota_files:
        out += ["--quota-files", str(args.quota_files)]
    return out


def _pidfile(mountpoint: Path) -> Path:
    digest = hashlib.sha256(str(mountpoint).encode()).hexdigest()[:16]
    return RUN_DIR / f"mount-{digest}.pid"


# ---- umount ------------------------------------------------------------------------
def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = Path(os.path.abspath(args.mountpoint))
    entry = find_mount(mountpoint)
    if entry is None:
        raise UserError(f"{mountpoint}: not mounted")
    if entry.fstype != "fuse.azfs":
        raise UserError(f"{mountpoint}: not an azfs mount ({entry.fstype})")
    pidfile = _pidfile(mountpoint)
    pid = _read_pid(pidfile)
    cmd = ["fusermount3", "-u"] + (["-z"] if args.lazy else []) + [str(mountpoint)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        if "busy" in res.stderr.lower():
            raise UserError(f"{mountpoint}: busy (files are open); retry, or use --lazy")
        raise UserError(f"{mountpoint}: {res.stderr.strip() or 'unmount failed'}")
    if pid is not None and not args.lazy:
        deadline = time.monotonic() + UMOUNT_WAIT
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
    return 0


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


# ---- usage ---------------------------------------------------------------------------
def cmd_usage(args: argparse.Namespace) -> int:
    from azfs.usage import read_usage

    try:
        used, files, clean = read_usage(args.source)
    except LookupError:
        raise UserError(f"{args.source}: usage unknown (never served by azfs)") from None
    except OSError as exc:
        raise UserError(f"{args.source}: {exc.strerror}") from None
    if args.json:
        print(json.dumps({"bytes": used, "files": files, "in_use": not clean}))
    else:
        print(f"{used} bytes, {files} files{' (mounted)' if not clean else ''}")
    return 0
