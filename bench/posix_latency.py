#!/usr/bin/env python3
"""A latency-bound share: azfs vs bindfs vs the share itself, P parallel workers, one run.

The share is the slowfs fixture (tests/support/slowfs.py): a passthrough FUSE
filesystem over a local directory that delays every request by --latency-ms,
as a network share (Azure Files over SMB) does.  A vfolder directory on it is
served three ways: through ``azfs mount``, through ``bindfs -o allow_other``
(the C passthrough peer; single-threaded by default, so also as ``bindfs-mt``
with ``--multithreaded``), and directly (the fixture itself).  P worker
processes, each in its own directory as separate containers would be, run at
once; every cell starts from fresh mounts and dropped caches (cold):

* read: 20 files of 256 KiB each, whole, in 1 MiB ``read()``s (files/s)
* ls -l: ``listdir`` + ``lstat`` of a directory of 500 files each (files/s)
* create: 200 files of 100 bytes each: create, write, close (files/s)

Printed: files/s summed over the workers (all files / wall time from the
first start to the last finish), the speed ratios azfs/bindfs and
azfs/bindfs-mt, and each target's scaling, throughput at P over its
throughput at P = 1 (>= 5 at P = 8 is the goal for azfs).  Needs root,
``bindfs`` and ``fusermount3``.

    .venv/bin/python bench/posix_latency.py                 # P = 1, 8, 32
    .venv/bin/python bench/posix_latency.py --quick         # P = 1, 8, fewer files
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from azfs.units import parse_size  # noqa: E402
from azfs.volumes.mountinfo import is_mounted  # noqa: E402
from tests.support.slowfs import SlowVolume, slow_volume  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from posix_fs import machine  # noqa: E402  (one description of the machine for every bench)

CHUNK = 1 << 20
FAILED = float("nan")
TARGETS = ("azfs", "bindfs", "bindfs-mt", "fixture")


# ---- environment (shared with posix_metadata.py) ------------------------------------
def drop_caches() -> bool:
    """Page, dentry and inode caches; False when the system does not let us."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def azfs_command() -> list[str]:
    script = Path(sys.executable).with_name("azfs")
    return [str(script)] if script.exists() else [sys.executable, "-m", "azfs.cli.main"]


def wait_mounted(path: Path, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not is_mounted(path):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{path}: mount process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path}: not mounted after {timeout}s")
        time.sleep(0.05)


def lazy_unmount(path: Path) -> None:
    for _ in range(5):
        if not is_mounted(path):
            return
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True,
                       timeout=60, check=False)


@contextlib.contextmanager
def azfs_mount(source: Path, mnt: Path, log: Path, options: list[str]) -> Iterator[Path]:
    """``azfs mount`` of ``source``; unmounted on the way out, whatever happened."""
    mnt.mkdir(exist_ok=True)
    try:
        res = subprocess.run([*azfs_command(), "mount", "--log-file", str(log), *options,
                              str(source), str(mnt)], capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"azfs mount failed: {res.stderr.strip()}")
        yield mnt
    finally:
        if is_mounted(mnt):
            subprocess.run([*azfs_command(), "umount", str(mnt)], capture_output=True,
                           timeout=120, check=False)
        lazy_unmount(mnt)


@contextlib.contextmanager
def bindfs_mount(source: Path, mnt: Path, *options: str) -> Iterator[Path]:
    with daemon_mount(["bindfs", "-f", "-o", "allow_other", *options, str(source), str(mnt)],
                      mnt) as path:
        yield path


@contextlib.contextmanager
def daemon_mount(argv: list[str], mnt: Path) -> Iterator[Path]:
    """A FUSE daemon run in the foreground (``argv``) serving ``mnt``; unmounted after."""
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_mounted(mnt, proc)
        yield mnt
    finally:
        lazy_unmount(mnt)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so that every ``finally`` unmounts."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def render(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r in rows:
        cells = [c.ljust(w) if i == 0 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def rate(value: float, unit: str = "files/s") -> str:
    return "FAILED" if value != value else f"{value:,.0f} {unit}"


def ratio(a: float, b: float) -> str:
    return "n/a" if a != a or b != b or not b else f"{a / b:.2f}"


# ---- workloads: one worker's share of a cell; each returns files done ---------------------
def read_files(directory: Path, count: int, _size: int) -> int:
    buf = bytearray(CHUNK)
    for i in range(count):
        with open(directory / "read" / f"r{i:04d}", "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return count


def ls_l(directory: Path, _count: int, _size: int) -> int:
    target = directory / "ls"
    names = os.listdir(target)
    for name in names:
        os.lstat(target / name)
    return len(names)


def create_files(directory: Path, count: int, _size: int) -> int:
    payload = b"x" * 100
    for i in range(count):
        fd = os.open(directory / f"c{i:04d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, payload)
        finally:
            os.close(fd)
    return count


WORKLOADS: dict[str, Callable[[Path, int, int], int]] = {
    "read": read_files, "ls": ls_l, "create": create_files}


def _worker(workload: str, directory: str, count: int, size: int, start: object,
            results: object) -> None:
    try:
        start.wait()  # type: ignore[attr-defined]
        t0 = time.monotonic()
        done = WORKLOADS[workload](Path(directory), count, size)
        results.put(("ok", t0, time.monotonic(), done))  # type: ignore[attr-defined]
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put(("error", repr(exc), 0.0, 0))  # type: ignore[attr-defined]


def run_parallel(workload: str, dirs: list[Path], count: int, size: int,
                 before_start: Callable[[], None]) -> float:
    """Runs the workload in one process per directory, all at once; files/s."""
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(len(dirs) + 1)
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(workload, str(d), count, size, start, results),
                         daemon=True) for d in dirs]
    try:
        for p in procs:
            p.start()
        before_start()
        start.wait(timeout=120)
        got = [results.get(timeout=3600) for _ in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(10)
    errors = [g[1] for g in got if g[0] == "error"]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(dirs)} workers failed: {errors[0]}")
    elapsed = max(g[2] for g in got) - min(g[1] for g in got)
    return sum(g[3] for g in got) / elapsed


# ---- the run ---------------------------------------------------------------------------------
def prepare(vf: Path, workers: int, args: argparse.Namespace) -> None:
    """Each worker's files, written straight to the share's local source."""
    block = os.urandom(args.read_size)
    for w in range(workers):
        (vf / f"w{w:02d}" / "read").mkdir(parents=True, exist_ok=True)
        (vf / f"w{w:02d}" / "ls").mkdir(exist_ok=True)
        for i in range(args.read_files):
            (vf / f"w{w:02d}" / "read" / f"r{i:04d}").write_bytes(
                w.to_bytes(2, "little") + i.to_bytes(2, "little") + block[4:])
        for i in range(args.ls_files):
            (vf / f"w{w:02d}" / "ls" / f"l{i:05d}").write_bytes(b"y" * (i % 100))


@contextlib.contextmanager
def stack(target: str, work: Path, args: argparse.Namespace) -> Iterator[Path]:
    """A fresh share (and azfs or bindfs over it): the vfolder's path through ``target``."""
    share: SlowVolume | None = None
    try:
        share = slow_volume(work / "run", args.latency_ms, source=work / "disk",
                            mountpoint=work / "share", cache_timeout=args.share_cache_timeout)
        vf = share.mountpoint / "vf"
        if target == "fixture":
            yield vf
        elif target.startswith("bindfs"):
            options = ("--multithreaded",) if target == "bindfs-mt" else ()
            with bindfs_mount(vf, work / "via-bindfs", *options) as mnt:
                yield mnt
        else:
            with azfs_mount(vf, work / "via-azfs", work / "run" / "azfs.log",
                            args.azfs_option) as mnt:
                yield mnt
    finally:
        if share is not None:
            share.cleanup()
        lazy_unmount(work / "share")


def cell(target: str, workload: str, workers: int, rep: int, work: Path,
         args: argparse.Namespace) -> float:
    count = {"read": args.read_files, "ls": args.ls_files, "create": args.create_files}[workload]
    with stack(target, work, args) as vf:
        dirs = [vf / f"w{w:02d}" for w in range(workers)]
        if workload == "create":
            dirs = [d / f"new-{target}-p{workers}-{rep}" for d in dirs]
            for d in dirs:
                d.mkdir()
        return run_parallel(workload, dirs, count, args.read_size, drop_caches)


def run(args: argparse.Namespace) -> int:
    for tool in ("bindfs", "fusermount3"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (Debian: apt-get install {tool})")
    if not drop_caches():
        print("NOTE: dropping caches is not permitted: cells are not cold", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="azfs-bench-latency-", dir=args.dir))
    (work / "run").mkdir()
    (work / "disk" / "vf").mkdir(parents=True)
    workloads = [w for w in ("read", "ls", "create") if w in args.rows]
    results: dict[tuple[str, int, str], float] = {}
    print(f"# {machine()}; latency {args.latency_ms} ms, P {args.parallel}, "
          f"{args.read_files} x {args.read_size // 1024} KiB, {args.ls_files} listed, "
          f"{args.create_files} created per worker", file=sys.stderr, flush=True)
    try:
        prepare(work / "disk" / "vf", max(args.parallel), args)
        for workers in args.parallel:
            for workload in workloads:
                for target in TARGETS:
                    runs = []
                    for rep in range(args.repeat):
                        try:
                            runs.append(cell(target, workload, workers, rep, work, args))
                        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                            print(f"  {workload} P={workers} {target} FAILED: {exc}",
                                  file=sys.stderr, flush=True)
                            break
                    value = statistics.median(runs) if len(runs) == args.repeat else FAILED
                    results[workload, workers, target] = value
                    print(f"  {workload:6} P={workers:<3} {target:8} {rate(value)}",
                          file=sys.stderr, flush=True)
    finally:
        lazy_unmount(work / "via-azfs")
        lazy_unmount(work / "via-bindfs")
        lazy_unmount(work / "share")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(report(args, workloads, results))
    return 0


def report(args: argparse.Namespace, workloads: list[str],
           results: dict[tuple[str, int, str], float]) -> str:
    labels = {"read": f"cold read {args.read_files} x {args.read_size // 1024} KiB",
              "ls": f"ls -l {args.ls_files} files", "create": f"create {args.create_files} files"}
    base = min(args.parallel)
    head = ["workload", "P", *TARGETS, "azfs/bindfs", "azfs/bindfs-mt",
            *(f"{t} P/P={base}" for t in TARGETS[:3])]
    rows = []
    for workload in workloads:
        for workers in args.parallel:
            v = {t: results[workload, workers, t] for t in TARGETS}
            rows.append([labels[workload], str(workers), *(rate(v[t]) for t in TARGETS),
                         ratio(v["azfs"], v["bindfs"]), ratio(v["azfs"], v["bindfs-mt"]),
                         *(ratio(v[t], results[workload, base, t]) for t in TARGETS[:3])])
    return (f"\nMachine: {machine()}\nShare: slowfs, {args.latency_ms} ms per request, "
            f"kernel cache timeout {args.share_cache_timeout} s; fresh mounts and dropped "
            f"caches per cell; median of {args.repeat}; files/s summed over P workers "
            f"(ratios >= 1.00: azfs as fast)\n\n" + render(head, rows))


def parallel_list(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError("worker counts must be >= 1")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latency-ms", type=float, default=2.0, help="delay per share request")
    p.add_argument("--parallel", type=parallel_list, default=None,
                   help="worker counts, comma-separated (default 1,8,32)")
    p.add_argument("--read-files", type=int, default=None, help="files read per worker (20)")
    p.add_argument("--read-size", type=parse_size, default=256 * 1024,
                   help="size of each file read (256K)")
    p.add_argument("--ls-files", type=int, default=None, help="files listed per worker (500)")
    p.add_argument("--create-files", type=int, default=None,
                   help="files created per worker (200)")
    p.add_argument("--rows", default="read,ls,create", help="rows to run (read,ls,create)")
    p.add_argument("--repeat", type=int, default=1, help="runs per cell (median)")
    p.add_argument("--share-cache-timeout", type=float, default=1.0,
                   help="the share's kernel entry/attribute timeout (cifs actimeo=1)")
    p.add_argument("--quick", action="store_true",
                   help="P = 1,8 and a quarter of the files: a quick look")
    p.add_argument("--dir", default=None, help="where to create the work directory "
                   "(default: the system temp dir; a real disk, not tmpfs)")
    p.add_argument("--azfs-option", action="append", default=[],
                   help="extra option for 'azfs mount' (repeatable)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    quick = args.quick
    args.parallel = args.parallel or ([1, 8] if quick else [1, 8, 32])
    args.read_files = args.read_files or (5 if quick else 20)
    args.ls_files = args.ls_files or (125 if quick else 500)
    args.create_files = args.create_files or (50 if quick else 200)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if unknown := set(args.rows) - set(WORKLOADS):
        p.error(f"unknown rows: {', '.join(sorted(unknown))}")
    if min(args.read_files, args.ls_files, args.create_files, args.repeat) < 1 \
            or args.read_size < 4 or args.latency_ms < 0:
        p.error("counts and sizes must be positive, the latency >= 0")
    if os.geteuid() != 0:
        raise SystemExit("run as root (FUSE mounts with allow_other, dropping caches)")
    exit_on_sigterm()
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted; everything is unmounted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
