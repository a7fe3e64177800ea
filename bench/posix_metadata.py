#!/usr/bin/env python3
"""Metadata work in a container: plain directory vs bindfs vs azfs, side by side in one run.

What ``pip install``, ``git clone`` or untarring into a vfolder does, as a
user would do it, in Python: one vfolder directory served four ways at once,

* plain: the directory itself;
* bindfs: ``bindfs -o allow_other`` of it (the C passthrough peer);
* azfs mount: ``azfs mount`` of it;
* azfs +xattrs: the same with ``--xattrs`` (extended attributes served: the
  kernel then asks for ``security.capability`` before every write);
* kernel view: a real ``azfs-agentd`` (tests/support/agent.py) exports it to a
  kernel; the work runs in ``<fuse>/kernels/<id>/<alias>``, as in a container;
* pyfuse3 floor: ``bench/memfs.py``, an in-memory pyfuse3 filesystem with
  azfs's mount options and timeouts that does no work but answer (always in
  memory, also with --latency-ms): the most any pyfuse3 daemon reaches here.

Rows, each target in a fresh directory of its own:

* create+stat: a loop over FILES files of 100 bytes: create, write, close,
  ``stat`` (files/s);
* scandir+stat: ``os.scandir`` of that directory and ``stat()`` of every
  entry, --rounds times (listings/s).

The ratio columns are speed ratios against bindfs (>= 1.00: as fast), for
``azfs mount``, the kernel view and the pyfuse3 floor.  The directory is on local disk,
or with --latency-ms on the slowfs share stand-in (tests/support/slowfs.py)
with that delay per request.  Needs root, ``bindfs`` and ``fusermount3``.

    .venv/bin/python bench/posix_metadata.py                    # 2,000 files
    .venv/bin/python bench/posix_metadata.py --quick            # 500 files, once
    .venv/bin/python bench/posix_metadata.py --latency-ms 2     # on a latency-bound share
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from posix_latency import (  # noqa: E402
    FAILED,
    azfs_mount,
    bindfs_mount,
    daemon_mount,
    exit_on_sigterm,
    lazy_unmount,
    machine,
    rate,
    ratio,
    render,
)

from tests.support.agent import AgentHarness  # noqa: E402
from tests.support.slowfs import slow_volume  # noqa: E402

TARGETS = ("plain", "bindfs", "azfs mount", "azfs +xattrs", "kernel view", "pyfuse3 floor")
MEMFS = Path(__file__).resolve().parent / "memfs.py"
PAYLOAD = b"x" * 100


def create_stat(directory: Path, count: int) -> float:
    """files/s of create, write, close, stat."""
    directory.mkdir()
    start = time.perf_counter()
    for i in range(count):
        path = directory / f"f{i:05d}"
        with open(path, "wb") as f:
            f.write(PAYLOAD)
        os.stat(path)
    return count / (time.perf_counter() - start)


def scandir_stat(directory: Path, rounds: int) -> float:
    """listings/s of scandir + stat of every entry."""
    start = time.perf_counter()
    for _ in range(rounds):
        with os.scandir(directory) as entries:
            for entry in entries:
                entry.stat()
    return rounds / (time.perf_counter() - start)


def memfs_mount(mnt: Path) -> contextlib.AbstractContextManager[Path]:
    """``bench/memfs.py`` at ``mnt``: pyfuse3 with no backend behind it."""
    return daemon_mount([sys.executable, str(MEMFS), str(mnt)], mnt)


@contextlib.contextmanager
def kernel_view(work: Path, volume_dir: Path, vfolder: str) -> Iterator[Path]:
    """A real agent with one bind volume over ``volume_dir``, ``vfolder`` exported."""
    agent = AgentHarness(work / "agent", volumes={"vol1": "requested"})
    agent.sources["vol1"] = volume_dir
    agent.write_volumes({"vol1": "requested"})
    transport = httpx.HTTPTransport(uds=str(agent.socket))
    try:
        agent.start()
        with httpx.Client(transport=transport, base_url="http://agent", timeout=60) as http:
            r = http.put("/v1/kernels/bench", json={"vfolders": [
                {"alias": "data", "volume": "vol1", "path": vfolder}]})
            if r.status_code != 200:
                raise RuntimeError(f"export failed: {r.status_code} {r.text}")
            try:
                yield agent.fuse_path("bench", "data")
            finally:
                with contextlib.suppress(httpx.HTTPError):
                    http.delete("/v1/kernels/bench")
    finally:
        agent.cleanup()


def run(args: argparse.Namespace) -> int:
    for tool in ("bindfs", "fusermount3"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (Debian: apt-get install {tool})")
    work = Path(tempfile.mkdtemp(prefix="azfs-bench-meta-", dir=args.dir))
    (work / "run").mkdir()
    disk = work / "disk"
    (disk / "vf").mkdir(parents=True)
    results: dict[tuple[str, str], list[float]] = {}
    failed: set[str] = set()
    print(f"# {machine()}; {args.files} files, {args.rounds} listings, median of "
          f"{args.repeat}; " + (f"share latency {args.latency_ms} ms"
                                if args.latency_ms is not None else "local disk"),
          file=sys.stderr, flush=True)
    try:
        with contextlib.ExitStack() as stack:
            base = disk
            if args.latency_ms is not None:
                share = slow_volume(work / "run", args.latency_ms, source=disk,
                                    mountpoint=work / "share")
                stack.callback(share.cleanup)
                base = share.mountpoint
            vf = base / "vf"
            paths: dict[str, Path] = {"plain": vf}
            paths["bindfs"] = stack.enter_context(bindfs_mount(vf, work / "via-bindfs"))
            paths["azfs mount"] = stack.enter_context(
                azfs_mount(vf, work / "via-azfs", work / "run" / "azfs.log", args.azfs_option))
            paths["azfs +xattrs"] = stack.enter_context(
                azfs_mount(vf, work / "via-azfs-x", work / "run" / "azfs-x.log",
                           [*args.azfs_option, "--xattrs"]))
            paths["kernel view"] = stack.enter_context(kernel_view(work, base, "vf"))
            paths["pyfuse3 floor"] = stack.enter_context(memfs_mount(work / "via-memfs"))
            for rep in range(args.repeat):
                for target in TARGETS:
                    if target in failed:
                        continue
                    directory = paths[target] / f"meta-{target.replace(' ', '-')}-{rep}"
                    try:
                        made = create_stat(directory, args.files)
                        listed = scandir_stat(directory, args.rounds)
                    except OSError as exc:
                        print(f"  {target} FAILED: {exc}", file=sys.stderr, flush=True)
                        failed.add(target)
                        continue
                    results.setdefault(("create", target), []).append(made)
                    results.setdefault(("list", target), []).append(listed)
                    print(f"  {target:12} {rate(made)}, {rate(listed, 'listings/s')}",
                          file=sys.stderr, flush=True)
    finally:
        for name in ("via-azfs", "via-azfs-x", "via-bindfs", "via-memfs", "share"):
            lazy_unmount(work / name)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(report(args, results, failed))
    return 0


def report(args: argparse.Namespace, results: dict[tuple[str, str], list[float]],
           failed: set[str]) -> str:
    def value(row: str, target: str) -> float:
        runs = results.get((row, target), [])
        return FAILED if target in failed or not runs else statistics.median(runs)

    head = ["workload", *TARGETS, "azfs mount/bindfs", "kernel view/bindfs", "floor/bindfs",
            "xattrs on/off"]
    rows = []
    for row, label, unit in (("create", f"create+stat {args.files} files", "files/s"),
                             ("list", f"scandir+stat of {args.files}", "listings/s")):
        v = {t: value(row, t) for t in TARGETS}
        rows.append([label, *(rate(v[t], unit) for t in TARGETS),
                     ratio(v["azfs mount"], v["bindfs"]), ratio(v["kernel view"], v["bindfs"]),
                     ratio(v["pyfuse3 floor"], v["bindfs"]),
                     ratio(v["azfs +xattrs"], v["azfs mount"])])
    where = (f"slowfs share, {args.latency_ms} ms per request" if args.latency_ms is not None
             else "local disk")
    return (f"\nMachine: {machine()}\nSource: {where}; {args.files} files of 100 bytes, "
            f"{args.rounds} listings, warm caches, median of {args.repeat} "
            f"(ratios >= 1.00: azfs as fast)\n\n" + render(head, rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=None, help="files per directory (2000)")
    p.add_argument("--rounds", type=int, default=None, help="listings per directory (20)")
    p.add_argument("--repeat", type=int, default=None, help="runs per cell (median, 3)")
    p.add_argument("--latency-ms", type=float, default=None,
                   help="put the directory on the slowfs share with this delay per request")
    p.add_argument("--quick", action="store_true", help="500 files, 5 listings, once")
    p.add_argument("--dir", default=None, help="where to create the work directory "
                   "(default: the system temp dir; a real disk, not tmpfs)")
    p.add_argument("--azfs-option", action="append", default=[],
                   help="extra option for 'azfs mount' (repeatable)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    args.files = args.files or (500 if args.quick else 2000)
    args.rounds = args.rounds or (5 if args.quick else 20)
    args.repeat = args.repeat or (1 if args.quick else 3)
    if min(args.files, args.rounds, args.repeat) < 1:
        p.error("--files, --rounds and --repeat must be >= 1")
    if args.latency_ms is not None and args.latency_ms < 0:
        p.error("--latency-ms must be >= 0")
    if os.geteuid() != 0:
        raise SystemExit("run as root (FUSE mounts with allow_other, an agent)")
    exit_on_sigterm()
    try:
        return run(args)
    except (RuntimeError, subprocess.SubprocessError, httpx.HTTPError) as exc:
        print(f"posix_metadata: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; everything is unmounted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
