"""The quickstart end to end: ``azfs up``, ``azfs demo``, ``azfs down`` as a user runs them.

Real processes throughout: Azurite from the npm install, managerd on
SQLite, agentd with its FUSE process, etcd for ``--etcd local``, and the
demo's two kernels as runc containers of a busybox rootfs.  Each test uses
free loopback ports and a temp state dir, and always runs ``azfs down``
(plus a last-resort kill and lazy unmount) even when it fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from azfs.containers.runc import Runc
from azfs.volumes.hostmount import lazy_unmount
from azfs.volumes.mountinfo import mounts_under
from tests.support.azurite import azurite_binary
from tests.support.containers import require_runc
from tests.support.services import free_port

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(azurite_binary()).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    for name in ("AZFS_NODE_DIR", "AZFS_TOKEN", "AZFS_MANAGER_URL"):
        env.pop(name, None)
    return env


def azfs(state: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "azfs.cli.main", *args, "--state-dir",
                           str(state)], capture_output=True, text=True, env=_env(), cwd=REPO,
                          timeout=timeout, check=False)


def node_processes(state: Path) -> dict[int, str]:
    """Processes whose command line names the state dir (the node's services)."""
    marker = f"{state}/"
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                stat = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
                if marker in line and stat != "Z":
                    found[int(entry.name)] = line
    return found


def mounted(state: Path) -> list[str]:
    return sorted(e.mount_point for e in mounts_under(state))


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    """A node state dir that is always brought down, even if the test failed."""
    require_runc()
    azurite_binary()  # fails (or skips on request) when Azurite is not installed
    root = tmp_path / "node"
    try:
        yield root
    finally:
        if root.exists():
            azfs(root, "down")
        for pid in node_processes(root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for mount in sorted(mounted(root), key=len, reverse=True):
            with contextlib.suppress(Exception):
                lazy_unmount(mount)


def _ports() -> list[str]:
    return ["--manager-port", str(free_port()), "--azurite-port", str(free_port())]


def _secrets(state: Path) -> list[str]:
    return [p.read_text().strip() for p in (state / "secrets").iterdir()]


@pytest.mark.parametrize("store", ["yaml", "etcd"])
def test_up_demo_down_leaves_nothing_behind(state: Path, store: str) -> None:
    etcd = ["--etcd", "local", "--etcd-port", str(free_port())] if store == "etcd" else []
    services = ["azurite", "managerd", "agentd"] + (["etcd"] if etcd else [])
    up = azfs(state, "up", *_ports(), *etcd)
    assert up.returncode == 0, up.stdout + up.stderr
    for service in services:
        assert f"{service}: ready" in up.stdout
        assert (state / "run" / f"{service}.pid").exists()
    assert "azfs down" in up.stdout and "admin.token" in up.stdout
    if etcd:
        assert "imported into etcd" in up.stdout
    pids = set(node_processes(state))
    assert len(pids) == len(services) + 1  # and the FUSE process
    assert str(state / "agent" / "fuse") in mounted(state)

    # secrets: 0600 files, never printed, never on a command line
    secrets_dir = state / "secrets"
    assert secrets_dir.stat().st_mode & 0o777 == 0o700
    for path in secrets_dir.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path
    secrets = _secrets(state)
    assert {"admin.token", "storage.key"} <= {p.name for p in secrets_dir.iterdir()}
    for line in node_processes(state).values():
        assert not any(s in line for s in secrets)

    # a second `up` finds everything running and changes nothing
    again = azfs(state, "up", "--quiet")
    assert again.returncode == 0, again.stdout + again.stderr
    for service in services:
        assert f"{service}: already running" in again.stdout
    assert set(node_processes(state)) == pids
    # other settings while it runs: refused, nothing changes
    other = azfs(state, "up", "--manager-port", str(free_port()))
    assert other.returncode == 1 and "running with other settings" in other.stderr
    assert set(node_processes(state)) == pids

    # the demo: a kernel writes, a second one reads that and the dataset
    demo = azfs(state, "demo")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    out = demo.stdout
    assert "uid=1000(work)" in out
    writer = next(w for w in out.split() if w.startswith("demo-writer-"))
    assert f"hello from kernel {writer}" in out
    assert "0,0,0\n  1,1,1\n  2,4,2" in out
    assert "1000 /home/work/sample/train/part-0001.csv" in out
    assert "the dataset is read-only" in out
    assert "azfs down" in out and "azfs folder" in out and "azfs mount" in out
    secrets = _secrets(state)
    assert not any(s in out + demo.stderr + up.stdout + up.stderr for s in secrets)
    logs = [p for p in state.rglob("*.log") if "demo" not in p.parts]
    assert len(logs) >= 4
    for log in logs:  # no SAS signature, no key, no token in any log of the node
        text = log.read_text(errors="replace")
        assert "sig=" not in text and not any(s in text for s in secrets), log
    written = list((state / "share").glob("*/hello.txt"))
    assert [p.read_text() for p in written] == [f"hello from kernel {writer}\n"]
    # both kernels are gone: no container, no export on the agent
    assert Runc(state / "demo" / "runc").list() == []
    kernels = state / "agent" / "fuse" / "kernels"
    assert not kernels.exists() or not list(kernels.iterdir())

    assert azfs(state, "status").returncode == 0

    # a lost pid file (an `up` killed midway) does not hide a service from `down`
    (state / "run" / "managerd.pid").unlink()
    down = azfs(state, "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert "managerd: stopped (pid" in down.stdout and "no pid file" in down.stdout
    assert mounted(state) == []
    assert node_processes(state) == {}
    assert not list((state / "run").glob("*.pid"))
    assert not (state / "run" / "agent.sock").exists()
    # the data outlives the node
    assert written[0].read_text().startswith("hello from kernel")
    assert azfs(state, "status").returncode == 1

    # and down again is fine
    assert azfs(state, "down").returncode == 0


def test_failed_up_cleans_what_it_started_and_down_works(state: Path) -> None:
    # the agent cannot mount FUSE where a regular file stands: up fails at the last step
    (state / "agent").mkdir(parents=True)
    blocker = state / "agent" / "fuse"
    blocker.write_text("not a directory\n")
    etcd_port = free_port()
    up = azfs(state, "up", *_ports(), "--etcd", "local", "--etcd-port", str(etcd_port))
    assert up.returncode == 1, up.stdout + up.stderr
    assert "etcd: ready" in up.stdout and "managerd: ready" in up.stdout
    assert "agentd exited" in up.stderr and str(blocker) in up.stderr  # the log's tail
    assert "Traceback" not in up.stderr
    assert "cleaning up what this run started: managerd, azurite, etcd" in up.stdout
    assert node_processes(state) == {}
    assert mounted(state) == []

    down = azfs(state, "down")
    assert down.returncode == 0, down.stdout + down.stderr

    # a port taken by another program: a clear message, nothing left running
    blocker.unlink()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = str(sock.getsockname()[1])
        up = azfs(state, "up", "--manager-port", busy)
    assert up.returncode == 1
    assert f"port {busy} on 127.0.0.1 is in use" in up.stderr and "--manager-port" in up.stderr
    assert node_processes(state) == {}
    assert mounted(state) == []
    assert azfs(state, "down").returncode == 0


def test_bad_flags_change_nothing(tmp_path: Path) -> None:
    state = tmp_path / "node"
    bad = azfs(state, "up", "--etcd", "nowhere")
    assert bad.returncode == 1 and "--etcd must be HOST:PORT" in bad.stderr
    assert not state.exists()
    assert azfs(state, "down").returncode == 0
    assert "no azfs node" in azfs(state, "status").stderr


def test_quickstart_script_twice_then_down(state: Path) -> None:
    """The README's first command, run twice on one node (setup-env only checks here)."""
    env = {**_env(), "AZFS_NODE_DIR": str(state)}
    cmd = ["bash", str(REPO / "packaging" / "quickstart.sh"), *_ports()]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                           check=False)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "azurite: ready" in first.stdout and "The demo is done" in first.stdout
    assert "azfs down" in first.stdout
    pids = set(node_processes(state))
    cmd = cmd[:2]  # the second run finds the node's ports in its settings
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                            check=False)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "managerd: already running" in second.stdout
    assert "vfolder 'data' exists already" in second.stdout
    assert second.stdout.count("hello from kernel demo-writer-") == 1
    assert set(node_processes(state)) == pids
    assert len(list((state / "share").glob("*/hello.txt"))) == 1

    down = azfs(state, "down")
    assert down.returncode == 0, down.stderr
    assert mounted(state) == [] and node_processes(state) == {}
