"""Benchmark: how long running kernels lose /home/work/<alias> when the fusehost restarts.

Runs a real ``azfs-agentd`` (bind volumes on a temp dir) and ``--kernels``
busybox containers under runc, each exported one vfolder.  For each kind of
restart, ``--rounds`` times:

* **crash**: ``kill -9`` of the fusehost; the agent's watchdog restarts it;
* **planned**: ``POST /v1/fuse/restart`` (what ``azfs agent restart-fuse`` does);

one thread per kernel opens and reads a file through the kernel's bind (the
same mount the container holds, by propagation) every few milliseconds; the
**window** is the time from its first failed open to its next successful one.
After each round every container reads the file itself (``runc exec``).

Peer, in the same run: what a node without re-binding needs after a restart,
**recreating** a kernel (``runc delete``, unexport, export, ``runc run``, and
the same read) -- measured for one kernel at a time, with a live fusehost.

Usage (as root; needs runc and busybox-static)::

    .venv/bin/python bench/fuse_restart.py [--kernels 4] [--rounds 5] [--watchdog 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from azfs.containers.rootfs import build_busybox_rootfs  # noqa: E402
from azfs.containers.runc import KernelContainer, Runc  # noqa: E402
from azfs.export import ExportResponse  # noqa: E402
from tests.support.agent import AgentHarness  # noqa: E402

PROBE = "probe"


class Prober(threading.Thread):
    """Opens and reads ``path`` in a loop; records the outage windows it sees."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.windows: list[float] = []
        self.stop = threading.Event()
        self.failed_at: float | None = None

    def run(self) -> None:
        while not self.stop.is_set():
            now = time.monotonic()
            try:
                with open(self.path, "rb") as f:
                    ok = f.read() == b"probe\n"
            except OSError:
                ok = False
            if not ok and self.failed_at is None:
                self.failed_at = now
            elif ok and self.failed_at is not None:
                self.windows.append(now - self.failed_at)
                self.failed_at = None
            time.sleep(0.002)


def http(agent: AgentHarness, timeout: float = 120) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(agent.socket)),
                        base_url="http://agent", timeout=timeout)


def export(agent: AgentHarness, kernel_id: str, path: str) -> ExportResponse:
    body = {"vfolders": [{"alias": "data", "volume": "vol1", "path": path, "mode": "rw"}]}
    with http(agent) as c:
        r = c.put(f"/v1/kernels/{kernel_id}", json=body)
    r.raise_for_status()
    return ExportResponse.model_validate(r.json())


def container(runc: Runc, rootfs: Path, work: Path, answer: ExportResponse) -> KernelContainer:
    return KernelContainer(rootfs, answer, ["sleep", "3600"], runc=runc,
                           bundle_dir=work / f"bundle-{answer.kernel_id}")


def wait_windows(probers: list[Prober], count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(len(p.windows) >= count and p.failed_at is None for p in probers):
            return
        time.sleep(0.01)
    raise RuntimeError("a kernel did not get its vfolder back within "
                       f"{timeout:g}s")


def check_inside(kernels: list[KernelContainer]) -> None:
    for kernel in kernels:
        r = kernel.sh(f"cat /home/work/data/{PROBE}")
        if r.stdout != "probe\n":
            raise RuntimeError(f"{kernel.id} cannot read its vfolder: {r.stderr.strip()}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--watchdog", type=float, default=2.0,
                   help="the agent's watchdog_interval, seconds (default: the agent's own)")
    args = p.parse_args()
    if args.kernels < 1 or args.rounds < 1:
        p.error("--kernels and --rounds must be at least 1")

    with tempfile.TemporaryDirectory(prefix="azfs-bench-restart-") as tmp:
        root = Path(tmp)
        rootfs = build_busybox_rootfs(root / "rootfs")
        agent = AgentHarness(root / "node", volumes={"vol1": "requested"})
        agent.write_config(watchdog_interval=args.watchdog)
        runc = Runc(root / "runc")
        kernels: list[KernelContainer] = []
        probers: list[Prober] = []
        try:
            agent.start("--unmount-on-exit")
            for i in range(args.kernels):
                (agent.vfolder("vol1", f"v{i}") / PROBE).write_text("probe\n")
                kernels.append(container(runc, rootfs, root,
                                         export(agent, f"bench-{i}", f"v{i}")))
            check_inside(kernels)
            probers = [Prober(agent.state_dir / "homes" / k.id / "data" / PROBE)
                       for k in kernels]
            for prober in probers:
                prober.start()
            results: dict[str, list[float]] = {}
            done = 0
            for mode in ("crash", "planned"):
                results[mode] = []
                for _ in range(args.rounds):
                    if mode == "crash":
                        agent.kill_fusehost()
                    else:
                        with http(agent) as c:
                            c.post("/v1/fuse/restart").raise_for_status()
                    done += 1
                    wait_windows(probers, done)
                    results[mode] += [p.windows[-1] for p in probers]
                    check_inside(kernels)
            for prober in probers:
                prober.stop.set()

            # the peer: recreate one kernel (what a node without re-binding needs)
            results["recreate"] = []
            for _ in range(args.rounds):
                kernel = kernels.pop(0)
                began = time.monotonic()
                kernel.stop()
                with http(agent) as c:
                    c.delete(f"/v1/kernels/{kernel.id}").raise_for_status()
                i = int(kernel.id.rsplit("-", 1)[1])
                kernels.append(container(runc, rootfs, root,
                                         export(agent, kernel.id, f"v{i}")))
                check_inside(kernels[-1:])
                results["recreate"].append(time.monotonic() - began)
        finally:
            for prober in probers:
                prober.stop.set()
            for kernel in kernels:
                kernel.stop()
            agent.cleanup()

    peer = statistics.median(results["recreate"])
    print(f"{args.kernels} kernels, {args.rounds} rounds; window = first failed open "
          "to the next successful one, per kernel")
    print(f"{'':10} {'median':>10} {'max':>10} {'recreate / azfs':>16}")
    for mode in ("crash", "planned", "recreate"):
        values = results[mode]
        median = statistics.median(values)
        ratio = f"{peer / median:16.1f}" if mode != "recreate" else f"{'':>16}"
        print(f"{mode:10} {median * 1000:8.0f}ms {max(values) * 1000:8.0f}ms {ratio}")
    print("recreate: the peer -- a new container and export (and the kernel's process "
          "is gone)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
