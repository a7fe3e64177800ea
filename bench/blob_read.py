"""Blob dataset reads: azfs vs ``rclone mount`` vs a plain HTTP GET, in one run.

One Azurite, one blob (1 GiB by default) and one read-only container SAS for
all three readers.  Measured:

* plain GET: the whole blob with ``curl`` (the ceiling of the endpoint);
* sequential read through each mount, cold (empty caches, kernel page cache
  dropped), then warm twice: after dropping the kernel page cache (azfs
  serves its disk block cache, rclone re-downloads) and with the page cache;
* 4 KiB random reads (``POSIX_FADV_RANDOM``) on a freshly mounted, cold
  mount: reads per second.

Prints a table and the ratios azfs/rclone and azfs/GET.  Needs root (FUSE,
``drop_caches``), ``rclone``, ``curl``, ``fusermount3`` and Azurite (see
tests/support/azurite.py).  Never run by the test suite.

    .venv/bin/python bench/blob_read.py [--size-mib 1024] [--random-reads 2000]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.azurite import Azurite  # noqa: E402

MiB = 1024 * 1024
CONTAINER = "bench"
BLOB = "big.bin"


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return f"{os.cpu_count()} CPUs ({model}), {mem:.0f} GiB RAM, {platform.release()}"


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def upload(az: Azurite, size: int) -> None:
    from azure.storage.blob import BlobServiceClient
    client = BlobServiceClient.from_connection_string(
        az.connection_string, max_block_size=8 * MiB, max_single_put_size=8 * MiB)
    with contextlib.suppress(Exception):
        client.create_container(CONTAINER)
    rng = random.Random(1)
    chunk = rng.randbytes(8 * MiB)

    def stream():
        sent = 0
        while sent < size:
            n = min(len(chunk), size - sent)
            # vary each chunk a little so blocks are not identical
            yield sent.to_bytes(8, "little") + chunk[8:n]
            sent += n

    class Reader:
        def __init__(self) -> None:
            self.gen = stream()
            self.buf = b""

        def read(self, n: int = -1) -> bytes:
            while n < 0 or len(self.buf) < n:
                try:
                    self.buf += next(self.gen)
                except StopIteration:
                    break
            out, self.buf = (self.buf, b"") if n < 0 else (self.buf[:n], self.buf[n:])
            return out

    client.get_blob_client(CONTAINER, BLOB).upload_blob(Reader(), length=size,
                                                        overwrite=True, max_concurrency=4)


def read_all(path: Path, bufsize: int = MiB) -> tuple[int, float]:
    start = time.perf_counter()
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            data = os.read(fd, bufsize)
            if not data:
                break
            total += len(data)
    finally:
        os.close(fd)
    return total, time.perf_counter() - start


def random_reads(path: Path, size: int, count: int, budget_s: float) -> float:
    rng = random.Random(42)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        start = time.perf_counter()
        done = 0
        while done < count and time.perf_counter() - start < budget_s:
            off = rng.randrange(0, size - 4096) & ~4095
            if len(os.pread(fd, 4096, off)) != 4096:
                raise RuntimeError("short random read")
            done += 1
        return done / (time.perf_counter() - start)
    finally:
        os.close(fd)


def wait_mounted(mnt: Path, proc: subprocess.Popen | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.ismount(mnt):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mount exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{mnt} not mounted after {timeout}s")
        time.sleep(0.05)


def mounted(mnt: Path) -> bool:
    """From the mount table: a dead FUSE mount (its daemon killed) still counts."""
    target = str(mnt)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


def unmount(mnt: Path) -> None:
    for _ in range(50):
        if not mounted(mnt):
            return
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        time.sleep(0.1)


@contextlib.contextmanager
def azfs_mount(az: Azurite, work: Path, name: str):
    mnt, cache = work / f"mnt-{name}", work / f"cache-{name}"
    mnt.mkdir()
    sas_file = work / "sas"
    cmd = [str(REPO / ".venv" / "bin" / "azfs"), "mount", "--sas-file", str(sas_file),
           "--cache-dir", str(cache), "--cache-bytes", "4G", "--log-file",
           str(work / f"azfs-{name}.log"), az.container_url(CONTAINER), str(mnt)]
    env = dict(os.environ, AZFS_RUN_DIR=str(work / "run"))
    subprocess.run(cmd, check=True, env=env)
    try:
        wait_mounted(mnt)
        yield mnt
    finally:
        unmount(mnt)


@contextlib.contextmanager
def rclone_mount(az: Azurite, work: Path, name: str, sas: str):
    mnt = work / f"mnt-{name}"
    mnt.mkdir()
    conf = work / "rclone.conf"
    conf.write_text(f"[az]\ntype = azureblob\nsas_url = {az.container_url(CONTAINER, sas=sas)}\n")
    conf.chmod(0o600)
    proc = subprocess.Popen(["rclone", "--config", str(conf), "mount", f"az:{CONTAINER}",
                             str(mnt), "--read-only", "--log-file",
                             str(work / f"rclone-{name}.log")],
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


def pids_naming(mnt: Path) -> list[int]:
    """The processes (but this one) whose argv names ``mnt``: the daemons serving it."""
    target = os.fsencode(str(mnt))
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if target in Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0"):
                found.append(int(entry))
    return found


def abort_fuse(mnt: Path) -> None:
    """Kills the daemon serving ``mnt`` (started by this bench: its argv names the
    mountpoint), which aborts the FUSE connection so a hung request fails at once."""
    for pid in pids_naming(mnt):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def guarded(fn, mnt: Path, timeout: float) -> float | None:
    """Runs ``fn()`` with a watchdog; a peer that hangs is aborted and scores None."""
    result: list[float] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - reported below
            error.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        abort_fuse(mnt)
        thread.join(30)
        print(f"    (no progress within {timeout:.0f}s: aborted)", flush=True)
        return None
    if error:
        print(f"    (failed: {error[0]})", flush=True)
        return None
    return result[0]


def measure_mount(label: str, mount, size: int, random_count: int) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    seq_timeout = max(120.0, size / MiB / 5)  # slower than 5 MiB/s counts as hung

    def seq() -> float:
        n, t = read_all(path)
        if n != size:
            raise RuntimeError(f"read {n} of {size} bytes")
        return n / t / MiB

    with mount("seq") as mnt:
        path = mnt / BLOB
        drop_page_cache()
        out["cold"] = guarded(seq, mnt, seq_timeout)
        print(f"  {label}: sequential cold {out['cold'] or 0:.0f} MiB/s", flush=True)
        drop_page_cache()
        out["warm_dropped"] = guarded(seq, mnt, seq_timeout)
        out["warm_page_cache"] = guarded(seq, mnt, seq_timeout)
        print(f"  {label}: warm {out['warm_dropped'] or 0:.0f} MiB/s (page cache dropped), "
              f"{out['warm_page_cache'] or 0:.0f} MiB/s (page cache)", flush=True)
    with mount("rand") as mnt:
        drop_page_cache()
        out["random_iops"] = guarded(
            lambda: random_reads(mnt / BLOB, size, random_count, 60.0), mnt, 120.0)
        print(f"  {label}: 4 KiB random {out['random_iops'] or 0:.0f} reads/s", flush=True)
    return out


def fmt(value: float | None) -> str:
    return "hung" if value is None else f"{value:.0f}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--random-reads", type=int, default=2000)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench needs root (FUSE mounts, drop_caches)", file=sys.stderr)
        return 2
    for tool in ("rclone", "curl", "fusermount3"):
        if not shutil.which(tool):
            print(f"bench needs {tool}", file=sys.stderr)
            return 2
    size = args.size_mib * MiB
    work = Path(tempfile.mkdtemp(prefix="azfs-blobbench-"))
    az = Azurite(work / "azurite")
    try:
        az.start()
        print(f"machine: {machine()}")
        print(f"uploading a {args.size_mib} MiB blob to Azurite ...", flush=True)
        upload(az, size)
        sas = az.container_sas(CONTAINER, permission="rl")
        (work / "sas").write_text(sas)
        url = az.container_url(CONTAINER, sas=sas).replace(f"/{CONTAINER}?",
                                                           f"/{CONTAINER}/{BLOB}?")
        start = time.perf_counter()
        subprocess.run(["curl", "-sf", "-o", "/dev/null", url], check=True)
        get = size / (time.perf_counter() - start) / MiB
        print(f"  plain GET (curl): {get:.0f} MiB/s", flush=True)
        azfs = measure_mount("azfs", lambda n: azfs_mount(az, work, n), size,
                             args.random_reads)
        rclone = measure_mount("rclone", lambda n: rclone_mount(az, work, f"rc-{n}", sas),
                               size, args.random_reads)
    finally:
        for mnt in work.glob("mnt-*"):
            unmount(mnt)
        az.stop()
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'MiB/s (random: reads/s)':<40}{'azfs':>10}{'rclone':>10}{'azfs/rclone':>13}")
    rows = [("sequential, cold", "cold"),
            ("sequential, warm (page cache dropped)", "warm_dropped"),
            ("sequential, warm (page cache)", "warm_page_cache"),
            ("4 KiB random reads/s, cold", "random_iops")]
    for label, key in rows:
        a, r = azfs[key], rclone[key]
        print(f"{label:<40}{fmt(a):>10}{fmt(r):>10}{ratio(a, r):>13}")
    print(f"plain GET (curl): {get:.0f} MiB/s; azfs cold / GET = {ratio(azfs['cold'], get)}; "
          f"rclone cold / GET = {ratio(rclone['cold'], get)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
