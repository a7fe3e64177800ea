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

Then listing: a folder of ``--list-files`` blobs, ``ls -f | wc -l`` then
``ls -l`` on fresh mounts.  With ``import torch`` working, a DataLoader row
(``num_workers`` 8): samples/s, epoch 1 and 2, through each mount and a
local copy.  Needs root, ``rclone``, ``fusermount3`` and Azurite.  Never run
by the test suite.

    .venv/bin/python bench/blob_small_files.py [--quick] [--files 4000] [--readers 8,32]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from blob_read import drop_page_cache, machine, mounted, unmount, wait_mounted  # noqa: E402

from tests.support.azurite import Azurite  # noqa: E402

CONTAINER = "train"
LISTDIR = "flat"


# ---- dataset ------------------------------------------------------------------------
def upload(az: Azurite, names: list[str], size: int, threads: int = 16) -> None:
    from azure.core.exceptions import ResourceExistsError

    client = az.service_client().get_container_client(CONTAINER)
    with contextlib.suppress(ResourceExistsError):
        client.create_container()
    rng = random.Random(7)
    base = rng.randbytes(size)

    def put(i_name: tuple[int, str]) -> None:
        i, name = i_name
        data = i.to_bytes(8, "little") + base[8:] if size >= 8 else base
        client.upload_blob(name, data, overwrite=True)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, enumerate(names)))


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
    local = threading.local()
    base = f"/{az.account}/{CONTAINER}/"

    def one(name: str) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection("127.0.0.1", az.port, timeout=30)
        conn.request("GET", f"{base}{name}?{sas}", headers={"x-ms-version": "2021-08-06"})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200 or len(body) != size:
            raise RuntimeError(f"GET {name}: HTTP {resp.status}, {len(body)} bytes")

    start = time.perf_counter()
    parallel(one, names, readers)
    return len(names) / (time.perf_counter() - start)


# ---- mounts -------------------------------------------------------------------------
_serial = itertools.count()


@contextlib.contextmanager
def azfs_mount(az: Azurite, work: Path, cache: Path | None = None):
    n = next(_serial)
    mnt = work / f"mnt-azfs-{n}"
    mnt.mkdir()
    cache = cache or work / f"cache-azfs-{n}"
    cmd = [str(REPO / ".venv" / "bin" / "azfs"), "mount", "--sas-file", str(work / "sas"),
           "--cache-dir", str(cache), "--cache-bytes", "4G", "--log-file",
           str(work / f"azfs-{n}.log"), az.container_url(CONTAINER), str(mnt)]
    env = dict(os.environ, AZFS_RUN_DIR=str(work / "run"))
    subprocess.run(cmd, check=True, env=env)
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
                         check=True)
    return time.perf_counter() - start, res.stdout.strip()


def listing(az: Azurite, work: Path, sas: str, count: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for label, mount in (("azfs", lambda: azfs_mount(az, work)),
                         ("rclone", lambda: rclone_mount(az, work, sas))):
        with mount() as mnt:
            drop_page_cache()
            t, got = timed("ls -f | wc -l", mnt / LISTDIR)
            if int(got) != count + 2:
                raise RuntimeError(f"{label}: ls -f listed {got} names, expected {count + 2}")
            out[f"{label} ls -f"] = t
            out[f"{label} ls -l"], _ = timed("ls -l > /dev/null", mnt / LISTDIR)
        print(f"  listing {count} blobs, {label}: ls -f {out[f'{label} ls -f']:.2f} s, "
              f"ls -l {out[f'{label} ls -l']:.2f} s", flush=True)
    return out


def torch_rows(az: Azurite, work: Path, sas: str, n: int) -> dict[str, float] | None:
    try:
        import torch.utils.data as tud
    except ImportError:
        return None

    class Files(tud.Dataset):
        def __init__(self, paths: list[str]) -> None:
            self.paths = paths

        def __len__(self) -> int:
            return len(self.paths)

        def __getitem__(self, i: int) -> int:
            return read_file(self.paths[i])

    def epochs(root: Path) -> tuple[float, float]:
        drop_page_cache()
        rates = []
        for _ in range(2):
            start = time.perf_counter()
            paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
            loader = tud.DataLoader(Files(paths), batch_size=32, num_workers=8,
                                    shuffle=True)
            count = sum(len(batch) for batch in loader)
            rates.append(count / (time.perf_counter() - start))
        return rates[0], rates[1]

    out: dict[str, float] = {}
    local = work / "local-copy"
    with azfs_mount(az, work) as mnt:
        out["azfs e1"], out["azfs e2"] = epochs(mnt / "data")
        shutil.copytree(mnt / "data", local / "data")
    with rclone_mount(az, work, sas) as mnt:
        out["rclone e1"], out["rclone e2"] = epochs(mnt / "data")
    out["local e1"], out["local e2"] = epochs(local / "data")
    print("  torch: " + ", ".join(f"{k} {v:.0f}" for k, v in out.items()), flush=True)
    return out


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1,000 files, a listing of 3,000 blobs")
    parser.add_argument("--files", type=int, default=None, help="default 4000")
    parser.add_argument("--folders", type=int, default=100)
    parser.add_argument("--size-kib", type=int, default=112)
    parser.add_argument("--readers", default="8,32")
    parser.add_argument("--list-files", type=int, default=None, help="default 100000")
    parser.add_argument("--skip", default="", help="rows to skip: kernel,listing,torch")
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
    readers = [int(r) for r in args.readers.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    size = args.size_kib * 1024
    names = dataset_names(files, args.folders)
    work = Path(tempfile.mkdtemp(prefix="azfs-smallbench-"))
    az = Azurite(work / "azurite")
    results: dict[int, dict[str, float]] = {}
    kernel = lst = torch = None
    try:
        az.start()
        print(f"machine: {machine()}; load {os.getloadavg()[0]:.1f}")
        print(f"uploading {files} blobs of {args.size_kib} KiB in {args.folders} folders ...",
              flush=True)
        upload(az, names, size)
        if "listing" not in skip and list_files:
            print(f"uploading {list_files} blobs into {LISTDIR}/ ...", flush=True)
            upload(az, [f"{LISTDIR}/f{i:07d}" for i in range(list_files)], 16)
        sas = az.container_sas(CONTAINER, permission="rl")
        (work / "sas").write_text(sas)
        for r in readers:
            results[r] = small_files(az, work, sas, names, r, size)
        if "kernel" not in skip:
            kernel = second_kernel(az, work, sas, files, readers[0], size)
        if "listing" not in skip and list_files:
            lst = listing(az, work, sas, list_files)
        if "torch" not in skip:
            torch = torch_rows(az, work, sas, files)
    finally:
        for mnt in work.glob("mnt-*"):
            unmount(mnt)
        az.stop()
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"files/s, {files} blobs of {args.size_kib} KiB")
    head = f"{'readers':<10}{'azfs cold':>11}{'rclone cold':>13}{'GET':>8}" \
           f"{'azfs/rclone':>13}{'azfs/GET':>10}{'azfs warm':>11}{'rclone warm':>13}"
    print(head)
    for r, row in results.items():
        print(f"{r:<10}{row['azfs cold']:>11.0f}{row['rclone cold']:>13.0f}{row['GET']:>8.0f}"
              f"{ratio(row['azfs cold'], row['rclone cold']):>13}"
              f"{ratio(row['azfs cold'], row['GET']):>10}"
              f"{row['azfs warm']:>11.0f}{row['rclone warm']:>13.0f}")
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
              f"{lst['rclone ls -f']:.2f} s; ls -l azfs {lst['azfs ls -l']:.2f} s, "
              f"rclone {lst['rclone ls -l']:.2f} s")
    if torch:
        print("DataLoader samples/s (epoch 1, 2): " + ", ".join(
            f"{k} {torch[f'{k} e1']:.0f}/{torch[f'{k} e2']:.0f}"
            for k in ("azfs", "rclone", "local")))
    elif "torch" not in skip:
        print("DataLoader row skipped: torch is not installed (pip install torch==2.13.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
