"""Nobody on a node but root reaches a vfolder: every host path above a mount is root-only.

An attacker with a shell on a compute node is played by ``setpriv --reuid U
--regid U --clear-groups`` subprocesses, as uid 65534 and as uid 1000 (the
uid presented to the kernels: on a real node, whatever host account has that
number).  Each probes, for reading and for writing, every path under which
azfs mounts a volume or its FUSE namespace -- the raw volume, the manager's
and the agent's mounts of it, the FUSE views, the block cache, the secrets
-- on a node from ``azfs up`` and on an agent started as its systemd unit
would start it, and must get ``EACCES``.  The tests run in a directory that
everybody may traverse, and first show that the probe *can* read an open
file there, so a denial comes from azfs's own directories.  An inspection
mount by ``azfs mount`` is checked the same way, without and with
``--allow-other``.
"""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tomli_w

from azfs.volumes.hostmount import lazy_unmount
from azfs.volumes.mountinfo import mounts_under
from tests.support.containers import require_runc
from tests.support.fuse import Mount
from tests.support.fuse import cleanup as cleanup_mount
from tests.support.services import running, stop_process
from tests.test_t7_quickstart import _ports, azfs, mounted, node_processes

REPO = Path(__file__).resolve().parents[1]
PACKAGING = REPO / "packaging"
ATTACKERS = (65534, 1000)

#: runs as the attacker (stdlib only): every path's answer to a read and a write
PROBE = r"""
import errno, json, os, sys

def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

def read(path):
    if os.path.isdir(path) or path.endswith("/"):
        os.listdir(path)
    else:
        with open(path, "rb") as f:
            f.read(1)

def write(path):
    if os.path.isdir(path) or path.endswith("/"):
        name = os.path.join(path, ".probe-%d" % os.getuid())
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(name)
    else:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND))

print(json.dumps({p: [attempt(lambda: read(p)), attempt(lambda: write(p))]
                  for p in json.loads(sys.argv[1])}))
"""


def probe(uid: int, paths: list[Path]) -> dict[str, list[str]]:
    """``{path: [read, write]}`` as seen by ``uid`` ("ok" or the errno's name)."""
    argv = ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups",
            "/usr/bin/python3", "-I", "-c", PROBE,
            json.dumps([str(p) + ("/" if p.is_dir() else "") for p in paths])]
    done = subprocess.run(argv, capture_output=True, text=True, cwd="/", timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    return {k.rstrip("/"): v for k, v in json.loads(done.stdout).items()}


def assert_unreachable(paths: list[Path]) -> None:
    for uid in ATTACKERS:
        seen = probe(uid, paths)
        leaks = {p: r for p, r in seen.items() if r != ["EACCES", "EACCES"]}
        assert not leaks, f"uid {uid} reaches: {leaks}"


@pytest.fixture
def open_root() -> Iterator[Path]:
    """A temp dir every user may traverse (pytest's own temp root is 0700)."""
    if shutil.which("setpriv") is None or not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("needs setpriv and /usr/bin/python3")
    root = Path(tempfile.mkdtemp(prefix="azfs-isolation-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        for entry in sorted(mounts_under(root), key=lambda e: -len(e.mount_point)):
            with contextlib.suppress(Exception):
                lazy_unmount(entry.mount_point)
        shutil.rmtree(root, ignore_errors=True)


def check_probe_works(root: Path) -> None:
    """The attackers can read what is open to them here: the probe is able to fail."""
    public = root / "public"
    public.mkdir(mode=0o755, exist_ok=True)
    (public / "readme").write_text("open\n")
    (public / "readme").chmod(0o644)
    for uid in ATTACKERS:
        seen = probe(uid, [public, public / "readme"])
        assert seen[str(public)][0] == "ok" and seen[str(public / "readme")][0] == "ok"


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


# ---- a node from `azfs up` ------------------------------------------------------------------
@pytest.fixture
def node(open_root: Path) -> Iterator[Path]:
    require_runc()
    from tests.support.azurite import azurite_binary
    azurite_binary()
    state = open_root / "node"
    try:
        yield state
    finally:
        if state.exists():
            azfs(state, "down")
        for pid in node_processes(state):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        for mount in sorted(mounted(state), key=len, reverse=True):
            with contextlib.suppress(Exception):
                lazy_unmount(mount)


def test_a_node_from_up_is_root_only(node: Path, open_root: Path) -> None:
    check_probe_works(open_root)
    # an older install left its directories open: `up` closes them and says so
    (node / "agent").mkdir(parents=True)
    node.chmod(0o755)
    (node / "agent").chmod(0o777)
    up = azfs(node, "up", *_ports())
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"node state dir {node} had mode 0755; changed to 0700" in up.stderr
    assert f"node directory {node / 'agent'} had mode 0777; changed to 0700" in up.stderr
    for path in (node, node / "agent", node / "manager", node / "share", node / "secrets",
                 node / "cache", node / "azurite", node / "manager" / "mounts",
                 node / "manager" / "mounts" / "volumes", node / "agent" / "volumes"):
        assert _mode(path) == 0o700, path

    settings = json.loads((node / "node.json").read_text())
    token = (node / "secrets" / "admin.token").read_text().strip()
    with httpx.Client(base_url=f"http://127.0.0.1:{settings['manager_port']}", timeout=60,
                      headers={"Authorization": f"Bearer {token}"}) as http:
        vfolder = http.post("/v1/vfolders", json={"alias": "data"}).json()
        r = http.post("/v1/kernels", json={"kernel_id": "k1", "agent": "local",
                                           "vfolders": [{"vfolder": "data"}]})
        assert r.status_code == 201, r.text
        (home,) = [Path(m["source"]) for m in r.json()["mounts"]
                   if m["destination"] == "/home/work"]
        view = home / "data"  # the kernel's home holds its vfolders' binds
        # a file written through the kernel's view
        (view / "private.txt").write_text("only mine\n")
        vid = vfolder["path"]
        paths = [node, node / "share", node / "share" / vid, node / "share" / vid / "private.txt",
                 node / "manager" / "mounts" / "volumes" / "local-share" / vid / "private.txt",
                 node / "agent" / "volumes" / "local-share" / vid / "private.txt",
                 node / "agent" / "fuse", node / "agent" / "fuse" / "kernels" / "k1" / "data",
                 node / "agent" / "fuse" / "kernels" / "k1" / "data" / "private.txt",
                 view, view / "private.txt", node / "secrets" / "admin.token", node / "cache",
                 node / "azurite", node / "manager" / "managerd.db"]
        for path in paths:
            assert path.exists(), path  # root sees them all
        assert_unreachable(paths)
        assert http.delete("/v1/kernels/k1").status_code == 204
    assert (node / "share" / vid / "private.txt").read_text() == "only mine\n"


# ---- an agent started as its systemd unit starts it ----------------------------------------
def _unit_dirs(root: Path) -> dict[str, Path]:
    """The directories systemd makes for the agent's unit, with the unit's modes, under root."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(PACKAGING / "systemd" / "azfs-agentd.service")
    service = unit["Service"]
    made = {}
    for kind, base in (("State", "var/lib"), ("Cache", "var/cache"), ("Runtime", "run")):
        name = service.get(f"{kind}Directory")
        if name:
            path = root / base / name
            path.mkdir(parents=True)
            path.chmod(int(service.get(f"{kind}DirectoryMode", "0755"), 8))
            made[kind] = path
    return made


def _agent_config(root: Path) -> Path:
    """The example agent.toml, with its paths under ``root`` and a bind volume as the share."""
    config = tomllib.loads((PACKAGING / "examples" / "agent.toml").read_text())
    for key in ("state_dir", "fuse_mountpoint", "socket"):
        config[key] = str(root / config[key].lstrip("/"))
    config["cache"]["dir"] = str(root / config["cache"]["dir"].lstrip("/"))
    config["cache"]["size"] = "64M"
    config.pop("manager")  # no remote manager here; the socket is the API
    share = root / "srv" / "share"  # stands in for the cifs share (the operator's, 0700)
    (share / "vf1").mkdir(parents=True)
    share.parent.chmod(0o700)
    volumes = root / "etc" / "azfs" / "volumes.yaml"
    volumes.parent.mkdir(parents=True)
    volumes.write_text(f"volumes:\n  - name: shard\n    mount: {{at: requested, fstype: bind, "
                       f"path: {share}}}\n")
    config["store"] = {"volumes_file": str(volumes)}
    path = root / "etc" / "azfs" / "agent.toml"
    path.write_text(tomli_w.dumps(config))
    return path


def test_an_agent_started_as_its_unit_is_root_only(open_root: Path) -> None:
    check_probe_works(open_root)
    unit_dirs = _unit_dirs(open_root)
    config_file = _agent_config(open_root)
    config = tomllib.loads(config_file.read_text())
    state, fuse = Path(config["state_dir"]), Path(config["fuse_mountpoint"])
    cache, sock = Path(config["cache"]["dir"]), Path(config["socket"])
    state.mkdir(mode=0o755)  # as an install from before this check left it
    state.chmod(0o755)
    log = open_root / "agentd.log"

    def answers() -> bool:
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)),
                              base_url="http://agent", timeout=2) as http:
                return http.get("/v1/kernels").status_code == 200
        except httpx.HTTPError:
            return False

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "agentd.main", "--config", str(config_file)]  # ExecStart
    try:
        with running(cmd, log, answers, "azfs-agentd", env=env, cwd="/") as proc:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)),
                              base_url="http://agent", timeout=30) as http:
                r = http.put("/v1/kernels/k1", json={"uid": 1000, "gid": 1000, "vfolders": [
                    {"alias": "data", "kind": "posix", "volume": "shard", "path": "vf1"}]})
                assert r.status_code == 200, r.text
                (mount,) = [m for m in r.json()["mounts"]
                            if m["destination"] == "/home/work"]
                view = Path(mount["source"]) / "data"  # the kernel's home holds the binds
                (view / "private.txt").write_text("only mine\n")
                text = log.read_text()
                assert f"agent state_dir {state} had mode 0755; changed to 0700" in text
                for path in (unit_dirs["State"], unit_dirs["Cache"], state, cache,
                             state / "volumes"):
                    assert _mode(path) == 0o700, path
                paths = [unit_dirs["State"], state, fuse, view, view / "private.txt",
                         fuse / "kernels" / "k1" / "data" / "private.txt",
                         state / "volumes" / "shard" / "vf1" / "private.txt",
                         state / "journal.json", cache]
                for path in paths:
                    assert path.exists(), path
                assert_unreachable(paths)
                assert http.delete("/v1/kernels/k1").status_code == 204
            stop_process(proc)
    finally:
        pid_file = state / "run" / "fusehost.pid"
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text()), 9)


def test_an_agent_refuses_a_fuse_parent_it_does_not_own_if_it_is_open(open_root: Path
                                                                       ) -> None:
    config_file = _agent_config(open_root)
    config = tomllib.loads(config_file.read_text())
    outside = open_root / "mnt"  # the operator's directory, open to everyone
    outside.mkdir(mode=0o755)
    outside.chmod(0o755)
    config["fuse_mountpoint"] = str(outside / "azfs")
    config_file.write_text(tomli_w.dumps(config))
    done = subprocess.run([sys.executable, "-m", "agentd.main", "--config", str(config_file)],
                          capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 1
    out = done.stdout + done.stderr
    assert f"the FUSE mountpoint's parent directory {outside} has mode 0755" in out
    assert f"chmod 0700 {outside}" in out and "Traceback" not in out
    assert _mode(outside) == 0o755  # not the agent's to change
    assert mounts_under(open_root) == []


# ---- an inspection mount ------------------------------------------------------------------
@pytest.mark.parametrize("allow_other", [False, True])
def test_an_inspection_mount_is_roots_alone_unless_allow_other(open_root: Path,
                                                               allow_other: bool) -> None:
    check_probe_works(open_root)
    source = open_root / "vfolder"
    source.mkdir()
    (source / "notes.txt").write_text("inspect me\n")
    (source / "notes.txt").chmod(0o644)
    mnt = open_root / "inspect"
    mnt.mkdir(mode=0o755)
    mnt.chmod(0o755)
    m = Mount(source, mnt, ["--ro"], open_root / "mount.log", dict(os.environ),
              allow_other=allow_other)
    try:
        m.mount()
        assert (mnt / "notes.txt").read_text() == "inspect me\n"  # root's view
        paths = [mnt, mnt / "notes.txt"]
        if not allow_other:
            assert_unreachable(paths)
        else:
            for uid in ATTACKERS:  # let in, as the mount presents it: read-only
                seen = probe(uid, paths)
                for path in paths:
                    assert seen[str(path)][0] == "ok" and seen[str(path)][1] != "ok", seen
    finally:
        cleanup_mount(m)


def test_install_node_makes_its_state_directories_root_only(tmp_path: Path) -> None:
    """What ``install-node.sh`` would do here (dry run: this machine is not a node)."""
    done = subprocess.run([str(PACKAGING / "install-node.sh"), "--dry-run", "--prefix",
                           str(tmp_path / "opt")], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    for directory in ("/var/lib/azfs", "/var/lib/azfs/agent", "/var/lib/azfs/managerd",
                      "/var/cache/azfs", "/etc/azfs/tls", "/etc/azfs/cifs"):
        path = Path(directory)
        if not path.exists():
            assert f"[dry-run] install -d -m 0700 -o root -g root {directory}\n" in done.stdout
        elif _mode(path) != 0o700:
            assert f"[dry-run] chmod 0700 {directory}\n" in done.stdout
    assert not (tmp_path / "opt").exists()
