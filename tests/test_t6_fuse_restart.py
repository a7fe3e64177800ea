"""End to end: running runc containers keep /home/work through fusehost restarts.

A real ``azfs-agentd`` with its fusehost, bind volumes on temp dirs and
busybox containers run by runc as uid 1000.  Each container's main process
writes and reads files in ``/home/work/data`` in a loop.  The fusehost is
killed with SIGKILL (a crash) or replaced on request (an upgrade); the same
containers, never recreated, read back what was written before and their
new writes land on the volume.  At the end nothing is left mounted.
"""
# ruff: noqa: F811 - pytest fixtures are imported by name and requested by name

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

from azfs.containers.runc import KernelContainer, Runc
from azfs.export import ExportResponse
from tests.support.agent import AgentHarness, agent  # noqa: F401
from tests.support.containers import (  # noqa: F401
    busybox_rootfs_fixture,
    container_id,
    mountpoints_under,
    runc_fixture,
)

#: the kernel's job: count up, write each number through the vfolder, read it back;
#: the last number it managed goes to its home (not the vfolder), errors are skipped
LOOP = ("n=0; while :; do n=$((n+1)); "
        "if echo $n > /home/work/data/loop.tmp 2>/dev/null "
        "&& mv /home/work/data/loop.tmp /home/work/data/loop.last 2>/dev/null "
        "&& [ \"$(cat /home/work/data/loop.last 2>/dev/null)\" = $n ]; "
        "then echo $n > /home/work/ok; fi; sleep 0.05; done")
RECOVERY = 5.0


def _body(path: str) -> dict:
    return {"uid": 1000, "gid": 1000,
            "vfolders": [{"alias": "data", "volume": "vol1", "path": path, "mode": "rw",
                          "vfolder_id": f"vf-{path}"}]}


async def _export(agent: AgentHarness, kernel_id: str, body: dict) -> ExportResponse:
    async with agent.client() as http:
        r = await http.put(f"/v1/kernels/{kernel_id}", json=body)
    assert r.status_code == 200, r.text
    return ExportResponse.model_validate(r.json())


async def _health(agent: AgentHarness) -> dict:
    async with agent.client() as http:
        return (await http.get("/v1/health")).json()


def _start(runc: Runc, rootfs: Path, workdir: Path, export: ExportResponse) -> KernelContainer:
    return KernelContainer(rootfs, export, ["sh", "-c", LOOP], runc=runc,
                           bundle_dir=workdir / f"bundle-{export.kernel_id}")


def _counter(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _wait(what: str, check, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last is True:
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout:g}s (last: {last!r})")


def _reads_back(kernel: KernelContainer, name: str, text: str):  # type: ignore[no-untyped-def]
    def check() -> bool | str:
        r = kernel.sh(f"cat /home/work/data/{name}", timeout=10)
        return True if (r.exit_code, r.stdout) == (0, text) else r.stderr.strip()
    return check


def _advances(volume_file: Path, past: int):  # type: ignore[no-untyped-def]
    def check() -> bool | int:
        now = _counter(volume_file)
        return True if now > past + 2 else now
    return check


def _binds_at(agent: AgentHarness, kernel_id: str, rel: str) -> list[str]:
    target = str(agent.state_dir / "homes" / kernel_id / rel)
    return [m for m in agent.mounts() if m == target]


async def test_kill_9_of_the_fusehost_three_times_the_same_container_keeps_working(
        agent: AgentHarness, busybox_rootfs: Path, runc: Runc, tmp_path: Path) -> None:
    agent.stop()
    agent.start("--unmount-on-exit")
    shared = agent.vfolder("vol1", "crash")
    kid = container_id("crash")
    kernel = _start(runc, busybox_rootfs, tmp_path, await _export(agent, kid, _body("crash")))
    _wait("the loop writes through the vfolder", _advances(shared / "loop.last", 0), 20)

    for round_ in range(1, 4):
        r = kernel.sh(f"echo before-{round_} > /home/work/data/mark-{round_}")
        assert r.exit_code == 0, r.stderr
        old_pid = agent.fusehost_pid()
        agent.kill_fusehost()
        killed = _counter(shared / "loop.last")
        # the same container reads back what it wrote before the crash...
        _wait(f"round {round_}: read back after the crash",
              _reads_back(kernel, f"mark-{round_}", f"before-{round_}\n"), RECOVERY)
        # ...and its loop's new writes land on the volume again
        _wait(f"round {round_}: the loop's writes reach the volume",
              _advances(shared / "loop.last", killed), RECOVERY)
        assert kernel.status() == "running"
        assert agent.fusehost_pid() not in (None, old_pid)
        assert _binds_at(agent, kid, "data") == [_binds_at(agent, kid, "data")[0]], \
            "the dead bind was stacked under the new one instead of replaced"
        health = await _health(agent)
        assert health["fuse"]["restarts"] == round_
        assert health["kernel_binds"][kid] == {"live": True, "binds": {"data": "live",
                                                                       "datasets": "live"}}
    for round_ in range(1, 4):
        assert (shared / f"mark-{round_}").read_text() == f"before-{round_}\n"
    # nothing the loop wrote went into the bare directory under the bind (no gap)
    peek = tmp_path / "peek"
    peek.mkdir()
    subprocess.run(["mount", "--bind", str(agent.state_dir / "homes" / kid), str(peek)],
                   check=True)  # not recursive: shows the home's own directories
    try:
        assert sorted(os.listdir(peek)) == ["data", "datasets", "ok"]
        assert os.listdir(peek / "data") == []
    finally:
        subprocess.run(["umount", str(peek)], check=True)

    kernel.stop()
    async with agent.client() as http:
        assert (await http.delete(f"/v1/kernels/{kid}")).status_code == 204
    assert not (agent.state_dir / "homes" / kid).exists()
    assert agent.stop() == 0
    assert mountpoints_under(tmp_path) == []
    with open("/proc/mounts") as f:
        assert str(tmp_path) not in f.read()


#: holds a file of the vfolder open across the restart, then reports what a read of that
#: descriptor and a new open give (no hang: the exec has a deadline)
HOLD = ("exec 3< /home/work/data/held && echo open > /home/work/held.state && "
        "while [ ! -e /home/work/go ]; do sleep 0.05; done; "
        "if cat <&3 > /home/work/held.out 2> /home/work/held.err; then echo fd-ok; "
        "else echo fd-error; fi; cat /home/work/data/held")


async def test_planned_restart_with_two_running_containers(
        agent: AgentHarness, busybox_rootfs: Path, runc: Runc, tmp_path: Path) -> None:
    agent.stop()
    agent.start("--unmount-on-exit")
    volumes = {name: agent.vfolder("vol1", name) for name in ("up1", "up2")}
    kernels = {}
    for name in volumes:
        export = await _export(agent, container_id(name), _body(name))
        kernels[name] = _start(runc, busybox_rootfs, tmp_path, export)
    for name, volume in volumes.items():
        _wait(f"{name} writes", _advances(volume / "loop.last", 0), 20)
    (volumes["up1"] / "held").write_text("held-before\n")

    # a process of kernel 1 holds a vfolder file open across the restart
    holder_done: list = []

    k1 = kernels["up1"]
    holder = threading.Thread(target=lambda: holder_done.append(k1.sh(HOLD, timeout=60)))
    holder.start()
    try:
        _wait("the holder has its file open",
              lambda: (k1.scratch / "held.state").exists(), 10)
        before = {name: _counter(v / "loop.last") for name, v in volumes.items()}
        old_pid = agent.fusehost_pid()
        async with agent.client(timeout=120) as http:
            r = await http.post("/v1/fuse/restart")
        assert r.status_code == 200, r.text
        result = r.json()
        assert result["reason"] == "requested" and result["old_pid"] == old_pid
        assert result["pid"] == agent.fusehost_pid() != old_pid
        # two views re-attached, their two binds replaced (the startup volume's stay live)
        assert (result["views"], result["rebound"], result["failed"]) == (2, 2, 0)
    finally:
        (k1.scratch / "go").touch()
        holder.join(70)
    # the held descriptor gives an error (not a hang); a new open works
    (held,) = holder_done
    assert held.exit_code == 0, held.stderr
    assert held.stdout == "fd-error\nheld-before\n", (held.stdout, held.stderr)
    assert (k1.scratch / "held.err").read_text().strip(), "no error on the old descriptor"

    for name, volume in volumes.items():
        _wait(f"{name} writes after the restart",
              _advances(volume / "loop.last", before[name]), RECOVERY)
        assert kernels[name].status() == "running"
    health = await _health(agent)
    assert health["status"] == "ok"
    assert health["fuse"]["restarts"] == 1
    assert health["fuse"]["last_restart"]["reason"] == "requested"

    for kernel in kernels.values():
        kernel.stop()
        async with agent.client() as http:
            assert (await http.delete(f"/v1/kernels/{kernel.id}")).status_code == 204
    assert agent.stop() == 0
    assert mountpoints_under(tmp_path) == []
