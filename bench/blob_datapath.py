"""Which HTTP client should the blob read path use?  Measured in one run.

Reads the same blob on one Azurite with range GETs of one size, a few in
flight, through:

* the Azure SDK (``BlobClient.download_blob(offset, length).readinto``);
* httpx's ``AsyncClient`` on the trio event loop;
* ``http.client`` in worker threads with ``readinto`` into one buffer
  (what :mod:`azfs.blob.http` does);

and a single plain GET of the whole blob with curl (the ceiling).  Prints
MiB/s and the ratio to the best.  Never run by the test suite.

    .venv/bin/python bench/blob_datapath.py [--size-mib 256] [--range-mib 8] [--parallel 4]
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.azurite import Azurite  # noqa: E402

MiB = 1024 * 1024


async def with_httpx(url: str, size: int, chunk: int, parallel: int) -> None:
    import httpx
    limiter = trio.Semaphore(parallel)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=parallel)) as client:
        async def one(offset: int) -> None:
            async with limiter:
                end = min(size, offset + chunk) - 1
                resp = await client.get(url, headers={"x-ms-range": f"bytes={offset}-{end}",
                                                      "x-ms-version": "2021-08-06"})
                assert resp.status_code == 206 and len(resp.content) == end - offset + 1

        async with trio.open_nursery() as nursery:
            for offset in range(0, size, chunk):
                nursery.start_soon(one, offset)


async def with_threads(url: str, size: int, chunk: int, parallel: int) -> None:
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    target = f"{parts.path}?{parts.query}"
    local = threading.local()
    limiter = trio.CapacityLimiter(parallel)

    def get(offset: int) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection(parts.hostname, parts.port,
                                                           timeout=30)
        end = min(size, offset + chunk) - 1
        conn.request("GET", target, headers={"x-ms-range": f"bytes={offset}-{end}",
                                             "x-ms-version": "2021-08-06"})
        resp = conn.getresponse()
        buf = bytearray(end - offset + 1)
        view, got = memoryview(buf), 0
        while got < len(buf):
            n = resp.readinto(view[got:])
            assert n, "short body"
            got += n
        assert resp.status == 206

    async with trio.open_nursery() as nursery:
        for offset in range(0, size, chunk):
            nursery.start_soon(lambda o=offset: trio.to_thread.run_sync(get, o,
                                                                        limiter=limiter))


def with_sdk(url: str, size: int, chunk: int, parallel: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from azure.storage.blob import BlobClient
    client = BlobClient.from_blob_url(url, max_chunk_get_size=chunk)

    def get(offset: int) -> None:
        length = min(chunk, size - offset)
        data = client.download_blob(offset=offset, length=length).readall()
        assert len(data) == length

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(get, range(0, size, chunk)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--range-mib", type=int, default=8)
    parser.add_argument("--parallel", type=int, default=4)
    args = parser.parse_args()
    size, chunk = args.size_mib * MiB, args.range_mib * MiB
    work = Path(tempfile.mkdtemp(prefix="azfs-datapath-"))
    az = Azurite(work)
    results: dict[str, float] = {}
    try:
        az.start()
        az.upload("datapath", {"blob.bin": os.urandom(size)})
        sas = az.container_sas("datapath")
        url = f"{az.container_url('datapath')}/blob.bin?{sas}"
        print(f"{os.cpu_count()} CPUs; {args.size_mib} MiB blob, {args.range_mib} MiB ranges, "
              f"{args.parallel} in flight", flush=True)
        runs = [
            ("curl, one plain GET", lambda: subprocess.run(
                ["curl", "-sf", "-o", "/dev/null", url], check=True)),
            ("Azure SDK download_blob", lambda: with_sdk(url, size, chunk, args.parallel)),
            ("httpx AsyncClient (trio)", lambda: trio.run(with_httpx, url, size, chunk,
                                                          args.parallel)),
            ("http.client in threads", lambda: trio.run(with_threads, url, size, chunk,
                                                        args.parallel)),
        ]
        for _ in range(2):  # best of two, alternating
            for name, fn in runs:
                if name.startswith("curl") and not shutil.which("curl"):
                    continue
                start = time.perf_counter()
                fn()
                rate = size / (time.perf_counter() - start) / MiB
                results[name] = max(rate, results.get(name, 0.0))
    finally:
        az.stop()
        shutil.rmtree(work, ignore_errors=True)
    best = max(v for k, v in results.items() if not k.startswith("curl"))
    for name, rate in results.items():
        print(f"{name:<28}{rate:>8.0f} MiB/s{rate / best:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
