#!/usr/bin/env python3
"""Posix vfolders: azfs vs bindfs vs the directory itself, side by side in one run.

One source directory is served three ways at once: through ``azfs mount``,
through ``bindfs -o allow_other`` (the C passthrough FUSE peer) and directly.
Every row runs the same work on the same files through each path:

* sequential write of a SIZE file (1 MiB writes; ``sync`` afterwards, untimed)
* sequential read of one SIZE file, cold (page cache dropped) and warm
* random 4 KiB ``pread``s in that file, cold and warm
* ``ls -l`` and a ``stat`` of every name in a directory of FILES files, cold and warm

"Cold" means ``echo 3 > /proc/sys/vm/drop_caches`` before the measurement (as
root); when that is not permitted the report says so.  Each cell is the median
of --repeat runs.  The ratio columns are speed ratios: azfs/bindfs = bindfs's
time divided by azfs's time, so >= 1.00 means azfs is at least as fast.

    python bench/posix_fs.py                         # 1 GiB, 20,000 files
    python bench/posix_fs.py --size 256M --files 2000  # quick
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import shutil
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

CHUNK = 1 << 20
FAILED = float("nan")  # a cell whose run failed (the error is printed as it happens)
BLOCK = 4096
TARGETS = ("azfs", "bindfs", "direct")


# ---- environment -----------------------------------------------------------------
def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 2**20:.0f} GiB RAM"
    return f"{os.cpu_count()} CPUs ({cpu}){mem}, Linux {platform.release()}"


class Caches:
    """Drops the page, dentry and inode caches when the system lets us."""

    def __init__(self) -> None:
        self.permitted = True

    def drop(self) -> None:
        os.sync()
        if not self.permitted:
            return
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError:
            self.permitted = False


def wait_mounted(path: Path, proc: subprocess.Popen | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.ismount(path):
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{path}: mount process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{path}: not mounted after {timeout}s")
        time.sleep(0.05)


def azfs_command() -> list[str]:
    script = Path(sys.executable).with_name("azfs")
    return [str(script)] if script.exists() else [sys.executable, "-m", "azfs.cli.main"]


@contextlib.contextmanager
def mounts(src: Path, work: Path, azfs_options: list[str]) -> Iterator[dict[str, Path]]:
    """azfs and bindfs mounts of ``src``; always unmounted on the way out."""
    paths = {"azfs": work / "via-azfs", "bindfs": work / "via-bindfs", "direct": src}
    paths["azfs"].mkdir()
    paths["bindfs"].mkdir()
    bindfs = None
    try:
        subprocess.run(azfs_command() + ["mount", "--log-file", str(work / "azfs.log"),
                                         *azfs_options, str(src), str(paths["azfs"])],
                       check=True)
        bindfs = subprocess.Popen(["bindfs", "-f", "-o", "allow_other", str(src),
                                   str(paths["bindfs"])], stdin=subprocess.DEVNULL)
        wait_mounted(paths["bindfs"], bindfs)
        yield paths
    finally:
        if os.path.ismount(paths["azfs"]):
            subprocess.run(azfs_command() + ["umount", str(paths["azfs"])])
        if bindfs is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(paths["bindfs"])])
            try:
                bindfs.wait(30)
            except subprocess.TimeoutExpired:
                bindfs.kill()


# ---- workloads (each returns seconds) ---------------------------------------------------
def seq_write(path: Path, size: int) -> float:
    buf = os.urandom(CHUNK)
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = size
        while left > 0:
            left -= os.write(fd, buf[:min(CHUNK, left)])
    finally:
        os.close(fd)
    return time.perf_counter() - start


def seq_read(path: Path) -> float:
    buf = bytearray(CHUNK)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - start


def random_reads(path: Path, offsets: list[int]) -> float:
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in offsets:
            os.pread(fd, BLOCK, off)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def ls_l(path: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["ls", "-l", "--color=never", str(path)], stdout=subprocess.DEVNULL,
                   check=True)
    return time.perf_counter() - start


def stat_all(path: Path) -> float:
    start = time.perf_counter()
    for name in os.listdir(path):
        os.lstat(path / name)
    return time.perf_counter() - start


# ---- the run ---------------------------------------------------------------------------------
class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, dict[str, float]]] = []

    def add(self, label: str, unit: str, values: dict[str, float]) -> None:
        self.rows.append((label, unit, values))
        print(f"  {label}: " + ", ".join(f"{t} {fmt(values[t], unit)}" for t in TARGETS),
              file=sys.stderr, flush=True)

    def render(self) -> str:
        head = ["workload", *TARGETS, "azfs/bindfs", "azfs/direct"]
        lines = []
        for label, unit, v in self.rows:
            # values are seconds: speed ratio = peer's time / azfs's time
            ratios = [v[peer] / v["azfs"] if v["azfs"] else float("inf")
                      for peer in ("bindfs", "direct")]
            lines.append([label, *(fmt(v[t], unit) for t in TARGETS),
                          *("n/a" if r != r else f"{r:.2f}" for r in ratios)])
        widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
        out = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |",
               "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        for r in lines:
            cells = [c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(r, widths, strict=True))]
            out.append("| " + " | ".join(cells) + " |")
        return "\n".join(out)


def fmt(seconds: float, unit: str) -> str:
    if seconds != seconds:
        return "FAILED"
    if unit.startswith("MiB/s:"):
        nbytes = int(unit.split(":")[1])
        return f"{nbytes / seconds / 2**20:.0f} MiB/s"
    if unit.startswith("ops/s:"):
        n = int(unit.split(":")[1])
        return f"{n / seconds:,.0f} op/s"
    return f"{seconds:.3f} s"


def measure(caches: Caches, repeat: int, cold: bool,
            fn: Callable[[str], float]) -> dict[str, float]:
    """Median seconds per target; targets interleave within each round."""
    runs: dict[str, list[float]] = {t: [] for t in TARGETS}
    failed: dict[str, str] = {}
    for _ in range(repeat):
        for t in TARGETS:
            if t in failed:
                continue
            if cold:
                caches.drop()
            try:
                runs[t].append(fn(t))
            except (OSError, subprocess.CalledProcessError) as exc:
                failed[t] = str(exc)
                print(f"  {t} FAILED: {exc}", file=sys.stderr)
    return {t: FAILED if t in failed else statistics.median(v) for t, v in runs.items()}


def run(args: argparse.Namespace) -> int:
    if shutil.which("bindfs") is None:
        raise SystemExit("bindfs is not installed (Debian: apt-get install bindfs)")
    work = Path(tempfile.mkdtemp(prefix="azfs-bench-", dir=args.dir))
    src = work / "src"
    src.mkdir()
    caches = Caches()
    table = Table()
    size, nfiles = args.size, args.files
    print(f"# {machine()}; size {size / 2**20:.0f} MiB, {nfiles} files, "
          f"median of {args.repeat}", file=sys.stderr)
    try:
        many = src / "many"
        many.mkdir()
        for i in range(nfiles):
            (many / f"file-{i:06d}").write_bytes(b"x" * (i % 100))
        with mounts(src, work, args.azfs_option) as paths:
            if args.only != "meta":
                io_rows(args, caches, table, paths, src)
            if args.only != "io":
                meta_rows(args, caches, table, paths)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nMachine: {machine()}")
    print(f"File size {size / 2**20:.0f} MiB, {nfiles} files, {args.random_reads} random "
          f"reads, median of {args.repeat}; ratios are speed ratios (>= 1.00: azfs as fast)")
    if not caches.permitted:
        print("NOTE: dropping caches was not permitted: 'cold' rows are not cold")
    print()
    print(table.render())
    return 0


def io_rows(args: argparse.Namespace, caches: Caches, table: Table, paths: dict[str, Path],
            src: Path) -> None:
    size = args.size
    table.add("seq write", f"MiB/s:{size}", measure(
        caches, args.repeat, True,
        lambda t: seq_write(paths[t] / f"write-{t}.bin", size)))
    for t in TARGETS:
        os.unlink(src / f"write-{t}.bin")
    data = "data.bin"
    seq_write(src / data, size)
    table.add("seq read, cold", f"MiB/s:{size}", measure(
        caches, args.repeat, True, lambda t: seq_read(paths[t] / data)))

    def warm_read(t: str) -> float:
        seq_read(paths[t] / data)
        return seq_read(paths[t] / data)
    table.add("seq read, warm", f"MiB/s:{size}", measure(
        caches, args.repeat, False, warm_read))
    rng = random.Random(42)
    offsets = [rng.randrange(size // BLOCK) * BLOCK for _ in range(args.random_reads)]
    table.add("random 4K read, cold", f"ops/s:{len(offsets)}", measure(
        caches, args.repeat, True, lambda t: random_reads(paths[t] / data, offsets)))

    def warm_random(t: str) -> float:
        random_reads(paths[t] / data, offsets)
        return random_reads(paths[t] / data, offsets)
    table.add("random 4K read, warm", f"ops/s:{len(offsets)}", measure(
        caches, args.repeat, False, warm_random))


def meta_rows(args: argparse.Namespace, caches: Caches, table: Table,
              paths: dict[str, Path]) -> None:
    nfiles = args.files
    table.add(f"ls -l {nfiles} files, cold", "s", measure(
        caches, args.repeat, True, lambda t: ls_l(paths[t] / "many")))

    def warm_ls(t: str) -> float:
        ls_l(paths[t] / "many")
        return ls_l(paths[t] / "many")
    table.add(f"ls -l {nfiles} files, warm", "s", measure(
        caches, args.repeat, False, warm_ls))
    table.add(f"stat {nfiles} files, cold", "s", measure(
        caches, args.repeat, True, lambda t: stat_all(paths[t] / "many")))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=1 << 30, help="file size (default 1G)")
    p.add_argument("--files", type=int, default=20000, help="files for ls -l/stat")
    p.add_argument("--random-reads", type=int, default=20000, help="4 KiB reads per run")
    p.add_argument("--repeat", type=int, default=3, help="runs per cell (median)")
    p.add_argument("--dir", default=None, help="where to create the work directory "
                   "(default: the system temp dir; must be a real disk, not tmpfs)")
    p.add_argument("--azfs-option", action="append", default=[],
                   help="extra option for 'azfs mount' (repeatable, e.g. "
                        "--azfs-option=--cache-timeout=5)")
    p.add_argument("--only", choices=("io", "meta"), default=None,
                   help="run only the data rows or only the metadata rows")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("run as root (allow_other mounts, dropping caches)")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
