"""Blob datasets as a training loop reads them: many small files, many readers.

One Azurite, one container, one read-only container SAS for every path.
``--files`` blobs of ``--size-kib`` KiB spread over ``--folders`` folders
(ImageNet-style class folders).  For each reader count (``--readers``) and
each path -- an ``azfs mount`` of the container SAS URL, an ``rclone mount``
of the same SAS URL, and plain keep-alive GETs with one connection per
reader (the ceiling) -- a fresh mount with empty caches (kernel page, dentry
and inode caches dropped) walks the tree and reads every file, the readers
taking files from one shared queue: files/s cold, then again on the same
mount (warm).

Then a second kernel: the node's FUSE process (``agentd.fusehost``) with two
views of the dataset (two kernels, one backend, one block cache); the first
reads everything, the page cache is dropped and the second reads everything:
its data GETs, counted from the process's ``stats``, and its files/s.

Then listing: a folder of ``--list-files`` blobs in an Azurite of its own
(see :func:`listing_store`), ``ls -f | wc -l`` then ``ls -l`` on fresh
mounts.  Then memory: on a fresh mount, a helper process opens
``--mem-files`` blobs of ``--mem-size-mib`` MiB, reads the head of each
(``--mem-read-kib``) and keeps them all open; the daemon's RSS (and, for
azfs, its read-ahead budget from ``azfs dataset stats``) before, while open
and after.  With ``import torch`` working (the ``bench`` extra), a DataLoader row
(``num_workers`` 8): samples/s, epoch 1 (cold) and 2 (warm), through each
mount and a local copy.  The machine's load average is printed at the start
and end of every row.  Needs root, ``rclone``, ``fusermount3`` and Azurite.
Never run by the test suite.

    .venv/bin/python bench/blob_small_files.py [--quick] [--files 4000] [--readers 8,32]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import http.client
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from blob_read import (  # noqa: E402
    drop_page_cache,
    machine,
    mounted,
    pids_naming,
    unmount,
    wait_mounted,
)

from tests.support.azurite import Azurite  # noqa: E402

CONTAINER = "train"
LISTDIR = "flat"
MEMDIR = "mem"
MiB = 1024 * 1024
X_MS_VERSION = "2021-08-06"
#: the SAS must outlive the whole run (rclone's is fixed in its config)
SAS_SECONDS = 12 * 3600


# ---- machine ------------------------------------------------------------------------
def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


#: row name -> (load at start, load at end, seconds)
ROW_LOADS: dict[str, tuple[str, str, float]] = {}


@contextlib.contextmanager
def row(name: str):
    """Prints the load average (1/5/15 min) at the start and end of one row."""
    before, start = load(), time.perf_counter()
    print(f"[{name}] load {before}", flush=True)
    try:
        yield
    finally:
        took = time.perf_counter() - start
        ROW_LOADS[name] = (before, load(), took)
        print(f"[{name}] done in {took:.0f} s, load {ROW_LOADS[name][1]}", flush=True)


# ---- dataset ------------------------------------------------------------------------
class Blobs:
    """Keep-alive HTTP to Azurite with a SAS, one connection per thread."""

    def __init__(self, az: Azurite, sas: str) -> None:
        self.az, self.sas = az, sas
        self.base = f"/{az.account}/{CONTAINER}/"
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection("127.0.0.1", self.az.port,
                                                                 timeout=60)
        return conn

    def request(self, method: str, name: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        headers = {"x-ms-version": X_MS_VERSION, **(headers or {})}
        for attempt in (1, 2):
            conn = self._conn()
            try:
                conn.request(method, f"{self.base}{name}?{self.sas}", body=body,
                             headers=headers)
                resp = conn.getresponse()
                return resp.status, resp.read()
            except (ConnectionError, http.client.HTTPException):
                # the server closed an idle keep-alive connection: one retry, new socket
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def put(self, name: str, data: bytes) -> None:
        status, body = self.request("PUT", name, data, {"x-ms-blob-type": "BlockBlob"})
        if status != 201:
            raise RuntimeError(f"PUT {name}: HTTP {status} {body[:200]!r}")

    def get(self, name: str, size: int) -> bytes:
        status, body = self.request("GET", name)
        if status != 200 or len(body) != size:
            raise RuntimeError(f"GET {name}: HTTP {status}, {len(body)} bytes")
        return body


def upload(az: Azurite, names: list[str], size: int, threads: int = 32) -> float:
    """PUTs ``names`` (``size`` bytes each, distinct first 8 bytes); returns seconds.

    Raw keep-alive PUTs with a write SAS, not the SDK: its per-request cost made
    100,000 tiny blobs take longer than the rest of the run."""
    from azure.core.exceptions import ResourceExistsError

    with contextlib.suppress(ResourceExistsError):
        az.service_client().create_container(CONTAINER)
    blobs = Blobs(az, az.container_sas(CONTAINER, permission="cw", seconds=SAS_SECONDS))
    base = random.Random(7).randbytes(size)
    start = time.perf_counter()

    def put(i_name: tuple[int, str]) -> None:
        i, name = i_name
        blobs.put(name, i.to_bytes(8, "little") + base[8:] if size >= 8 else base)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, enumerate(names), chunksize=64))
    took = time.perf_counter() - start
    print(f"  uploaded {len(names)} blobs of {size} bytes in {took:.1f} s "
          f"({len(names) / took:.0f} blobs/s, {threads} connections)", flush=True)
    return took


#: Azurite's metadata file (LokiJS) and its collection of blobs
AZURITE_DB = "__azurite_db_blob__.json"
BLOBS_COLLECTION = "$BLOBS_COLLECTION$"


def listing_store(work: Path, count: int, put: int) -> Azurite:
    """An Azurite of its own (started) holding ``LISTDIR/`` with ``count`` blobs.

    Its own, so that the other rows' GETs do not pay for these blobs: Azurite
    scans every blob of the account on each PUT and GET, so 100,000 PUTs take
    hours on 2 CPUs.  The first ``put`` blobs are uploaded; the rest are copies of
    their entries in Azurite's metadata file (new names and ETags, same extents):
    real blobs to every client, listed and read like the uploaded ones."""
    names = [f"{LISTDIR}/f{i:07d}" for i in range(count)]
    az = Azurite(work / "azurite-list")
    az.start()
    try:
        upload(az, names[:put], 16)
    finally:
        az.stop()  # writes the metadata file
    if count > put:
        start = time.perf_counter()
        clone_blobs(az.data / AZURITE_DB, names[put:])
        print(f"  {count - put} more blobs as copies of those entries in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    az.start()
    # a copied entry reads back like an uploaded one
    Blobs(az, az.container_sas(CONTAINER, seconds=SAS_SECONDS)).get(names[-1], 16)
    return az


def clone_blobs(db_file: Path, names: list[str]) -> None:
    """Adds a blob entry per name to a stopped Azurite's metadata, copying existing ones."""
    db = json.loads(db_file.read_text())
    coll = next(c for c in db["collections"] if c["name"] == BLOBS_COLLECTION)
    docs = coll["data"]
    templates = [json.dumps(d) for d in docs]
    if not templates:
        raise RuntimeError("no uploaded blob to copy")
    for i, name in enumerate(names):
        doc = json.loads(templates[i % len(templates)])
        coll["maxId"] += 1
        doc["$loki"] = coll["maxId"]
        doc["name"] = name
        doc["properties"]["etag"] = f'"0x{0x1D00000000000000 + coll["maxId"]:X}"'
        docs.append(doc)
    # LokiJS trusts its saved indexes (positions sorted by the property): rebuild them
    for prop, index in coll["binaryIndices"].items():
        index["values"] = sorted(range(len(docs)), key=lambda j: docs[j][prop])
        index["dirty"] = False
    coll["idIndex"] = None
    db_file.write_text(json.dumps(db))


def dataset_names(files: int, folders: int) -> list[str]:
    return [f"data/class{i % folders:03d}/img{i:07d}.jpg" for i in range(files)]


# ---- readers ------------------------------------------------------------------------
def read_file(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        total = 0
        while True:
            data = os.read(fd, 1 << 20)
            if not data:
                return total
            total += len(data)
    finally:
        os.close(fd)


def parallel(fn, items: list, readers: int) -> None:
    """``fn(item)`` for every item, ``readers`` threads taking items from one queue."""
    counter = itertools.count()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            while not errors:
                i = next(counter)
                if i >= len(items):
                    return
                fn(items[i])
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(readers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def walk_and_read(root: Path, readers: int, expect: int, size: int) -> float:
    """files/s of listing ``root`` and reading every file in it (like find | xargs cat)."""
    start = time.perf_counter()
    paths = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]
    if len(paths) != expect:
        raise RuntimeError(f"found {len(paths)} files, expected {expect}")
    sizes: list[int] = []

    def one(p: str) -> None:
        n = read_file(p)
        if n != size:
            sizes.append(n)

    parallel(one, paths, readers)
    if sizes:
        raise RuntimeError(f"{len(sizes)} files read short (e.g. {sizes[0]} bytes)")
    return expect / (time.perf_counter() - start)


def plain_gets(az: Azurite, sas: str, names: list[str], readers: int, size: int) -> float:
    """files/s of keep-alive GETs, one connection per reader thread (the ceiling)."""
    blobs = Blobs(az, sas)
    start = time.perf_counter()
    parallel(lambda name: blobs.get(name, size), names, readers)
    return len(names) / (time.perf_counter() - start)


def download(az: Azurite, sas: str, names: list[str], size: int, dest: Path,
             readers: int = 8) -> float:
    """Copies the blobs to ``dest`` with plain GETs (not through a mount); returns seconds."""
    blobs = Blobs(az, sas)
    start = time.perf_counter()

    def one(name: str) -> None:
        path = dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blobs.get(name, size))

    parallel(one, names, readers)
    os.sync()
    return time.perf_counter() - start


# ---- mounts -------------------------------------------------------------------------
_serial = itertools.count()


def azfs_env(work: Path) -> dict[str, str]:
    return dict(os.environ, AZFS_RUN_DIR=str(work / "run"))


@contextlib.contextmanager
def azfs_mount(az: Azurite, work: Path, cache: Path | None = None):
    n = next(_serial)
    mnt = work / f"mnt-azfs-{n}"
    mnt.mkdir()
    cache = cache or work / f"cache-azfs-{n}"
    cmd = [str(REPO / ".venv" / "bin" / "azfs"), "mount", "--sas-file", str(work / "sas"),
           "--cache-dir", str(cache), "--cache-bytes", "4G", "--log-file",
           str(work / f"azfs-{n}.log"), az.container_url(CONTAINER), str(mnt)]
    subprocess.run(cmd, check=True, env=azfs_env(work))
    try:
        wait_mounted(mnt)
        yield mnt
    finally:
        unmount(mnt)


@contextlib.contextmanager
def rclone_mount(az: Azurite, work: Path, sas: str):
    n = next(_serial)
    mnt = work / f"mnt-rclone-{n}"
    mnt.mkdir()
    conf = work / "rclone.conf"
    conf.write_text(f"[az]\ntype = azureblob\nsas_url = {az.container_url(CONTAINER, sas=sas)}\n")
    conf.chmod(0o600)
    proc = subprocess.Popen(["rclone", "--config", str(conf), "mount", f"az:{CONTAINER}",
                             str(mnt), "--read-only", "--log-file",
                             str(work / f"rclone-{n}.log")],
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_mounted(mnt, proc)
        yield mnt
    finally:
        unmount(mnt)
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()


def daemon_pid(mnt: Path) -> int:
    """The pid of the process serving ``mnt``: the one whose argv names the mountpoint."""
    found = pids_naming(mnt)
    if len(found) != 1:
        raise RuntimeError(f"{mnt}: {len(found)} processes name it, expected one")
    return found[0]


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS since the process started) of ``pid``, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def azfs_stats(work: Path, mnt: Path) -> dict:
    """The dataset's counters, as an operator reads them (``azfs dataset stats``)."""
    res = subprocess.run([str(REPO / ".venv" / "bin" / "azfs"), "dataset", "stats", str(mnt)],
                         capture_output=True, text=True, check=True, env=azfs_env(work))
    return json.loads(res.stdout)


class FuseHost:
    """The node's FUSE process, driven over its socket (two kernels' views)."""

    def __init__(self, work: Path) -> None:
        self.mnt = work / "mnt-node"
        self.mnt.mkdir()
        self.sock = work / "fusehost.sock"
        log = open(work / "fusehost.log", "ab")  # noqa: SIM115 - closed in stop()
        self._log = log
        self.proc = subprocess.Popen(
            [str(REPO / ".venv" / "bin" / "python"), "-m", "agentd.fusehost",
             "--mountpoint", str(self.mnt), "--socket", str(self.sock),
             "--cache-dir", str(work / "cache-node"), "--cache-bytes", str(4 << 30)],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True)
        deadline = time.monotonic() + 30
        while not (self.sock.exists() and mounted(self.mnt)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("fusehost did not start; see fusehost.log")
            time.sleep(0.05)

    def call(self, **request) -> dict:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.sock))
            s.sendall(json.dumps(request).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                buf += chunk
        answer = json.loads(buf)
        if not answer.get("ok"):
            raise RuntimeError(f"fusehost {request['op']}: {answer.get('message')}")
        return answer["result"]

    def blob_stats(self) -> dict:
        return next(iter(self.call(op="stats")["blob"].values()))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        unmount(self.mnt)
        self._log.close()


# ---- rows ---------------------------------------------------------------------------
def small_files(az: Azurite, work: Path, sas: str, names: list[str], readers: int,
                size: int) -> dict[str, float]:
    out: dict[str, float] = {}
    n = len(names)
    for label, mount in (("azfs", lambda: azfs_mount(az, work)),
                         ("rclone", lambda: rclone_mount(az, work, sas))):
        with mount() as mnt:
            drop_page_cache()
            out[f"{label} cold"] = walk_and_read(mnt / "data", readers, n, size)
            out[f"{label} warm"] = walk_and_read(mnt / "data", readers, n, size)
        print(f"  {readers:>2} readers, {label}: cold {out[f'{label} cold']:.0f}, "
              f"warm {out[f'{label} warm']:.0f} files/s", flush=True)
    out["GET"] = plain_gets(az, sas, names, readers, size)
    print(f"  {readers:>2} readers, plain GET: {out['GET']:.0f} files/s", flush=True)
    return out


def second_kernel(az: Azurite, work: Path, sas: str, n: int, readers: int,
                  size: int) -> dict[str, float]:
    """Kernels after the first on one node: another user's, and the same user's next job.

    k1 reads everything cold, then again (the warm rate).  k2 shows the files as
    another uid (inodes of its own): with the page cache dropped it reads from the
    node's block cache.  k3 shows them as k1 does (read-only, same uid): it shares
    k1's inodes, so it reads what k1 left in the page cache (refilled first).
    """
    host = FuseHost(work)
    try:
        backend = {"kind": "blob", "url": az.container_url(CONTAINER), "sas": sas}
        for k, uid in (("k1", 1000), ("k2", 1001), ("k3", 1000)):
            host.call(op="attach", path=["kernels", k, "ds"],
                      view={"label": "ds", "read_only": True, "uid": uid, "gid": 1000},
                      backend=backend, digest="bench")
        root = host.mnt / "kernels"
        drop_page_cache()
        first = walk_and_read(root / "k1/ds/data", readers, n, size)
        warm = walk_and_read(root / "k1/ds/data", readers, n, size)
        gets = [host.blob_stats()]
        drop_page_cache()
        second = walk_and_read(root / "k2/ds/data", readers, n, size)
        gets.append(host.blob_stats())
        walk_and_read(root / "k1/ds/data", readers, n, size)  # k1's page cache again
        gets.append(host.blob_stats())
        third = walk_and_read(root / "k3/ds/data", readers, n, size)
        gets.append(host.blob_stats())
    finally:
        host.stop()

    def data_gets(a: dict, b: dict) -> int:
        return b.get("http.data_gets", b["http.requests"]) - \
            a.get("http.data_gets", a["http.requests"])

    out = {"first": first, "warm": warm, "second": second, "third": third,
           "gets": data_gets(gets[0], gets[1]), "third gets": data_gets(gets[2], gets[3])}
    print(f"  kernels: first {first:.0f} files/s (warm {warm:.0f}); another user's, "
          f"block cache: {second:.0f} files/s, {out['gets']} data GETs; the same user's, "
          f"shared page cache: {third:.0f} files/s, {out['third gets']} data GETs",
          flush=True)
    return out


def timed(cmd: str, cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    res = subprocess.run(["sh", "-c", cmd], cwd=cwd, capture_output=True, text=True,
                         check=True, timeout=3600)
    return time.perf_counter() - start, res.stdout.strip()


def listing(az: Azurite, work: Path, sas: str, count: int) -> dict[str, float]:
    """Seconds of ``ls -f | wc -l``, then ``ls -l``; for azfs also its List Blobs calls."""
    out: dict[str, float] = {}
    for label, mount in (("azfs", lambda: azfs_mount(az, work)),
                         ("rclone", lambda: rclone_mount(az, work, sas))):
        lists = ""
        with mount() as mnt:
            drop_page_cache()
            t, got = timed("ls -f | wc -l", mnt / LISTDIR)
            if int(got) != count + 2:
                raise RuntimeError(f"{label}: ls -f listed {got} names, expected {count + 2}")
            out[f"{label} ls -f"] = t
            if label == "azfs":
                out["azfs lists ls -f"] = azfs_stats(work, mnt)["http.lists"]
            t, got = timed("ls -l | wc -l", mnt / LISTDIR)
            if int(got) != count + 1:  # the "total" line
                raise RuntimeError(f"{label}: ls -l listed {int(got) - 1} names, "
                                   f"expected {count}")
            out[f"{label} ls -l"] = t
            if label == "azfs":
                out["azfs lists ls -l"] = azfs_stats(work, mnt)["http.lists"] - \
                    out["azfs lists ls -f"]
                lists = (f" (List Blobs calls: {out['azfs lists ls -f']:.0f} for ls -f, "
                         f"{out['azfs lists ls -l']:.0f} more for ls -l)")
        print(f"  listing {count} blobs, {label}: ls -f {out[f'{label} ls -f']:.2f} s, "
              f"ls -l {out[f'{label} ls -l']:.2f} s{lists}", flush=True)
    return out


#: The helper of the memory row: opens every path of the list file, reads the first
#: HEAD bytes of each in reads of 64 KiB (refusing a short read), says so, and keeps
#: them all open until its stdin closes.
HOLDER = """
import os, sys
chunk = int(sys.argv[2])
fds = []
for path in open(sys.argv[1]).read().split():
    fd = os.open(path, os.O_RDONLY)
    fds.append(fd)
    got = 0
    while got < chunk:
        data = os.read(fd, min(65536, chunk - got))
        if not data:
            sys.exit(f"{path}: short read, {got} of {chunk} bytes")
        got += len(data)
print(f"open {len(fds)}", flush=True)
sys.stdin.read()
"""


def memory(work: Path, mount, names: list[str], head: int, hold: float,
           stats=None) -> dict[str, float]:
    """The daemon's memory while a helper holds ``names`` open (``head`` bytes read from each).

    RSS before, the largest VmRSS sampled while the files are open (every 50 ms
    for ``hold`` seconds once all are open, and while they are being opened),
    VmHWM (the kernel's peak RSS of the daemon, fresh with the mount), RSS
    once they are closed; ``stats(mnt)`` adds the daemon's budget counters."""
    out: dict[str, float] = {}
    listfile = work / "holder-paths"
    with mount() as mnt:
        drop_page_cache()
        pid = daemon_pid(mnt)
        out["rss before"] = memory_kib(pid)["VmRSS"] / 1024
        listfile.write_text("\n".join(str(mnt / n) for n in names) + "\n")
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(listfile), str(head)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        peak = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.wait(0.05):
                with contextlib.suppress(OSError):
                    peak = max(peak, memory_kib(pid)["VmRSS"])

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            start = time.perf_counter()
            line = holder.stdout.readline().strip()
            if line != f"open {len(names)}":
                raise RuntimeError(f"holder failed ({holder.wait()}): {line!r}")
            out["open s"] = time.perf_counter() - start
            time.sleep(hold)  # read-ahead of the open files runs or sits buffered
            if stats:
                now = stats(mnt)
                out["open_files"] = now["open_files"]
                out["budget used"] = now["budget.used"] / MiB
            holder.stdin.close()
            if holder.wait(60) != 0:
                raise RuntimeError(f"holder exited with {holder.returncode}")
        finally:
            stop.set()
            sampler.join()
            if holder.poll() is None:
                holder.kill()
                holder.wait()
        out["rss peak"] = peak / 1024
        out["hwm"] = memory_kib(pid)["VmHWM"] / 1024
        if stats:
            deadline = time.monotonic() + 30
            after = stats(mnt)
            while after["open_files"] and time.monotonic() < deadline:
                time.sleep(0.1)
                after = stats(mnt)
            out.update({"budget after": after["budget.used"] / MiB,
                        "budget peak": after["budget.peak"] / MiB,
                        "budget max": after["budget.max"] / MiB,
                        "fallbacks": after["read.budget_fallbacks"]})
        out["rss after"] = memory_kib(pid)["VmRSS"] / 1024
    return out


def memory_rows(az: Azurite, work: Path, sas: str, names: list[str], heads_kib: list[int],
                hold: float) -> dict[str, dict[str, float]]:
    """For each size of head read: azfs (RSS and budget), then rclone (RSS)."""
    out = {}
    for kib, (label, mount, stats) in itertools.product(heads_kib, (
            ("azfs", lambda: azfs_mount(az, work), lambda mnt: azfs_stats(work, mnt)),
            ("rclone", lambda: rclone_mount(az, work, sas), None))):
        m = out[f"{label}, {kib} KiB"] = memory(work, mount, names, kib * 1024, hold, stats)
        budget = (f", budget used {m['budget used']:.0f} MiB while open, peak "
                  f"{m['budget peak']:.0f} of {m['budget max']:.0f} MiB, "
                  f"{m['budget after']:.0f} MiB after close" if stats else "")
        print(f"  {len(names)} files open, {kib} KiB read, {label}: "
              f"RSS {m['rss before']:.0f} MiB before, "
              f"peak {m['rss peak']:.0f} MiB while open (VmHWM {m['hwm']:.0f}), "
              f"{m['rss after']:.0f} MiB after close{budget}", flush=True)
    return out


def torch_rows(az: Azurite, work: Path, sas: str, names: list[str],
               size: int) -> dict[str, float] | None:
    """A DataLoader (8 worker processes) over a Dataset that opens and reads each file.

    For each path: list the tree (timed apart: a training job lists once, then
    reads), drop the kernel caches, then two epochs of the same loader
    (persistent workers, shuffled): samples/s cold, then warm.  Every sample must
    read ``size`` bytes, and every epoch must see every file once.  The local copy
    is made with plain GETs before any timed epoch."""
    try:
        with warnings.catch_warnings():  # a CPU build without numpy warns on import
            warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
            import torch
            import torch.utils.data as tud
    except ImportError:
        return None

    class Files(tud.Dataset):
        def __init__(self, paths: list[str]) -> None:
            self.paths = paths

        def __len__(self) -> int:
            return len(self.paths)

        def __getitem__(self, i: int) -> int:
            n = read_file(self.paths[i])
            if n != size:
                raise RuntimeError(f"{self.paths[i]}: read {n} bytes, expected {size}")
            return n

    # torch warns that 8 workers exceed the CPUs; the row is about 8 readers all the same
    warnings.filterwarnings("ignore", message="This DataLoader will create")

    def epochs(label: str, root: Path) -> tuple[float, float]:
        start = time.perf_counter()
        paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root / "data") for f in fs)
        listed = time.perf_counter() - start
        if [os.path.relpath(p, root) for p in paths] != sorted(names):
            raise RuntimeError(f"{label}: listed {len(paths)} files, not the {len(names)}")
        loader = tud.DataLoader(Files(paths), batch_size=32, num_workers=8, shuffle=True,
                                persistent_workers=True,
                                generator=torch.Generator().manual_seed(0))
        drop_page_cache()
        rates = []
        for _ in range(2):
            start = time.perf_counter()
            count = nbytes = 0
            for batch in loader:
                count += len(batch)
                nbytes += int(batch.sum())
            rates.append(count / (time.perf_counter() - start))
            if count != len(names) or nbytes != len(names) * size:
                raise RuntimeError(f"{label}: an epoch read {count} samples, {nbytes} bytes")
        del loader  # its workers exit before the mount goes
        gc.collect()
        print(f"  DataLoader, {label}: listing {listed:.2f} s, epoch 1 {rates[0]:.0f}, "
              f"epoch 2 {rates[1]:.0f} samples/s", flush=True)
        return rates[0], rates[1]

    out: dict[str, float] = {}
    local = work / "local-copy"
    took = download(az, sas, names, size, local)
    print(f"  local copy: {len(names)} files in {took:.1f} s (plain GETs)", flush=True)
    with azfs_mount(az, work) as mnt:
        out["azfs e1"], out["azfs e2"] = epochs("azfs", mnt)
    with rclone_mount(az, work, sas) as mnt:
        out["rclone e1"], out["rclone e2"] = epochs("rclone", mnt)
    out["local e1"], out["local e2"] = epochs("local", local)
    return out


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1,000 files, a listing of 3,000 blobs, 100 files held open")
    parser.add_argument("--files", type=int, default=None, help="default 4000")
    parser.add_argument("--folders", type=int, default=100)
    parser.add_argument("--size-kib", type=int, default=112)
    parser.add_argument("--readers", default="8,32")
    parser.add_argument("--list-files", type=int, default=None, help="default 100000")
    parser.add_argument("--list-put", type=int, default=5000,
                        help="of those, how many are uploaded by PUT (default 5000); the "
                             "rest are copies of their entries in Azurite's metadata")
    parser.add_argument("--mem-files", type=int, default=None,
                        help="files held open in the memory row (default 500)")
    parser.add_argument("--mem-size-mib", type=int, default=4,
                        help="size of each of those blobs (default 4)")
    parser.add_argument("--mem-read-kib", default="64,256",
                        help="bytes read from the head of each held file, one run per "
                             "value (default 64,256: one 64 KiB read leaves azfs's "
                             "read-ahead idle; a second one starts it)")
    parser.add_argument("--hold", type=float, default=3.0,
                        help="seconds the memory row keeps the files open (default 3)")
    parser.add_argument("--skip", default="",
                        help="rows to skip: small,kernel,listing,memory,torch")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench needs root (FUSE mounts, drop_caches)", file=sys.stderr)
        return 2
    for tool in ("rclone", "fusermount3"):
        if not shutil.which(tool):
            print(f"bench needs {tool}", file=sys.stderr)
            return 2
    files = args.files or (1000 if args.quick else 4000)
    list_files = args.list_files if args.list_files is not None else \
        (3000 if args.quick else 100_000)
    mem_files = args.mem_files if args.mem_files is not None else (100 if args.quick else 500)
    readers = [int(r) for r in args.readers.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    size = args.size_kib * 1024
    names = dataset_names(files, args.folders)
    mem_names = [f"{MEMDIR}/blob{i:04d}.bin" for i in range(mem_files)]
    work = Path(tempfile.mkdtemp(prefix="azfs-smallbench-"))
    az = Azurite(work / "azurite")
    results: dict[int, dict[str, float]] = {}
    kernel = lst = mem = torch = None
    az_list: Azurite | None = None
    try:
        az.start()
        print(f"machine: {machine()}; load {load()}")
        with row("upload"):
            print(f"  {files} blobs of {args.size_kib} KiB in {args.folders} folders ...",
                  flush=True)
            upload(az, names, size)
            if "memory" not in skip and mem_files:
                print(f"  {mem_files} blobs of {args.mem_size_mib} MiB into {MEMDIR}/ ...",
                      flush=True)
                upload(az, mem_names, args.mem_size_mib * MiB, threads=8)
        sas = az.container_sas(CONTAINER, permission="rl", seconds=SAS_SECONDS)
        (work / "sas").write_text(sas)
        if "small" not in skip:
            for r in readers:
                with row(f"small files, {r} readers"):
                    results[r] = small_files(az, work, sas, names, r, size)
        if "kernel" not in skip:
            with row("second kernel"):
                kernel = second_kernel(az, work, sas, files, readers[0], size)
        if "listing" not in skip and list_files:
            with row("listing"):
                print(f"  {list_files} blobs of 16 bytes in {LISTDIR}/ of their own Azurite "
                      f"...", flush=True)
                az_list = listing_store(work, list_files, min(list_files, args.list_put))
                lst = listing(az_list, work, sas, list_files)
                az_list.stop()
        if "memory" not in skip and mem_files:
            with row("memory"):
                mem = memory_rows(az, work, sas, mem_names,
                                      [int(k) for k in args.mem_read_kib.split(",")],
                                      args.hold)
        if "torch" not in skip:
            with row("DataLoader"):
                torch = torch_rows(az, work, sas, names, size)
    finally:
        for mnt in work.glob("mnt-*"):
            unmount(mnt)
        az.stop()
        if az_list is not None:
            az_list.stop()
        shutil.rmtree(work, ignore_errors=True)

    print()
    if results:
        print(f"files/s, {files} blobs of {args.size_kib} KiB")
        head = f"{'readers':<10}{'azfs cold':>11}{'rclone cold':>13}{'GET':>8}" \
               f"{'azfs/rclone':>13}{'azfs/GET':>10}{'azfs warm':>11}{'rclone warm':>13}"
        print(head)
        for r, res in results.items():
            print(f"{r:<10}{res['azfs cold']:>11.0f}{res['rclone cold']:>13.0f}"
                  f"{res['GET']:>8.0f}{ratio(res['azfs cold'], res['rclone cold']):>13}"
                  f"{ratio(res['azfs cold'], res['GET']):>10}"
                  f"{res['azfs warm']:>11.0f}{res['rclone warm']:>13.0f}")
    if kernel:
        print(f"kernels on one node ({readers[0]} readers): first {kernel['first']:.0f} "
              f"files/s cold, {kernel['warm']:.0f} warm")
        print(f"  another user's (block cache): {kernel['second']:.0f} files/s "
              f"({ratio(kernel['second'], kernel['warm'])} of warm), "
              f"{kernel['gets']:.0f} data GETs")
        print(f"  the same user's next job (shared page cache): {kernel['third']:.0f} "
              f"files/s ({ratio(kernel['third'], kernel['warm'])} of warm), "
              f"{kernel['third gets']:.0f} data GETs")
    if lst:
        print(f"listing {list_files} blobs: ls -f azfs {lst['azfs ls -f']:.2f} s, rclone "
              f"{lst['rclone ls -f']:.2f} s ({ratio(lst['rclone ls -f'], lst['azfs ls -f'])} "
              f"speed); ls -l azfs {lst['azfs ls -l']:.2f} s, rclone "
              f"{lst['rclone ls -l']:.2f} s ({ratio(lst['rclone ls -l'], lst['azfs ls -l'])}); "
              f"azfs List Blobs calls {lst['azfs lists ls -f']:.0f} + "
              f"{lst['azfs lists ls -l']:.0f}")
    if mem:
        print(f"daemon memory, {mem_files} blobs of {args.mem_size_mib} MiB open, the head "
              f"of each read (MiB)")
        print(f"{'path, head read':<18}{'RSS before':>12}{'RSS peak':>10}{'VmHWM':>8}"
              f"{'RSS after':>11}"
              f"{'budget open':>13}{'budget peak':>13}{'budget max':>12}")
        for label, m in mem.items():
            budget = (f"{m['budget used']:>13.0f}{m['budget peak']:>13.0f}"
                      f"{m['budget max']:>12.0f}" if "budget max" in m else
                      f"{'-':>13}{'-':>13}{'-':>12}")
            print(f"{label:<18}{m['rss before']:>12.0f}{m['rss peak']:>10.0f}{m['hwm']:>8.0f}"
                  f"{m['rss after']:>11.0f}{budget}")
    if torch:
        print(f"DataLoader (num_workers 8), samples/s, {files} files")
        print(f"{'epoch':<10}{'azfs':>8}{'rclone':>8}{'local':>8}{'azfs/rclone':>13}"
              f"{'azfs/local':>12}")
        for e, label in (("e1", "1 (cold)"), ("e2", "2 (warm)")):
            a, r, loc = torch[f"azfs {e}"], torch[f"rclone {e}"], torch[f"local {e}"]
            print(f"{label:<10}{a:>8.0f}{r:>8.0f}{loc:>8.0f}{ratio(a, r):>13}"
                  f"{ratio(a, loc):>12}")
    elif "torch" not in skip:
        print("DataLoader row skipped: torch is not installed (pip install -e '.[bench]')")
    print("load average (1/5/15 min) per row: " + "; ".join(
        f"{name} {a} -> {b} ({took:.0f} s)" for name, (a, b, took) in ROW_LOADS.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
