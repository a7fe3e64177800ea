#!/usr/bin/env python3
"""The cost of a volume's worker thread against the system call it carries.

Runs ``fstat`` of a local directory N times in one trio process three ways:
inline on the event loop, through a :class:`~azfs.volumes.io.VolumeIO` in
threads mode (what a network share's calls take), and through
``trio.to_thread.run_sync`` (the library's own hop), and prints the cost of
one call each and the ratios.  This is the measurement behind running a
local filesystem's calls inline (``[volume_io] mode = "auto"``).

    .venv/bin/python bench/thread_hop.py [--calls 20000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from azfs.volumes.io import IOLimits, Kind, VolumeIO  # noqa: E402


async def measure(calls: int) -> dict[str, float]:
    fd = os.open(tempfile.gettempdir(), os.O_PATH)
    io = VolumeIO("bench", IOLimits(mode="threads"))
    limiter = trio.CapacityLimiter(32)
    out = {}
    try:
        start = time.perf_counter()
        for _ in range(calls):
            os.fstat(fd)
        out["inline"] = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(calls):
            await io.run(Kind.METADATA, os.fstat, fd)
        out["volume worker"] = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(calls):
            await trio.to_thread.run_sync(os.fstat, fd, limiter=limiter)
        out["trio.to_thread"] = time.perf_counter() - start
    finally:
        os.close(fd)
    return {k: v / calls * 1e6 for k, v in out.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=20000)
    args = p.parse_args()
    us = trio.run(measure, args.calls)
    print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
          f"{args.calls} calls each")
    print("| path | µs per fstat | / inline |")
    print("|---|---:|---:|")
    for name, value in us.items():
        print(f"| {name} | {value:.1f} | {value / us['inline']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
