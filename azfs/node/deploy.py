"""``azfs up`` / ``azfs down`` / ``azfs status``: one node's services under one state dir.

``up`` starts, in order, etcd (only with ``--etcd local``), Azurite (the
storage account, with a small sample dataset uploaded by the dataset
tools), managerd (SQLite; its first admin's token goes to a 0600 file) and
agentd (which starts the FUSE process).  Each one is waited for until it
answers; a service already running and answering is left alone, so ``up``
may be run any number of times.  If a service does not come up, ``up``
stops what *this* run started and fails with the end of that service's log.

``down`` stops whatever runs from the state dir -- found by pid file and,
for processes whose pid file was lost (an ``up`` killed midway), by their
command line naming the state dir -- then unmounts everything below the
state dir.  It works after a failed or interrupted ``up`` and when nothing
runs at all.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from azfs.errors import UserError
from azfs.node import procs, provision
from azfs.node.configs import write_configs
from azfs.node.layout import SAMPLE_DATASET, STORAGE_ACCOUNT, Layout, Settings
from azfs.node.procs import Service
from azfs.node.services import SERVICES, azurite_binary, check_port_free, ports, services

Say = Callable[[str], None]


# ---- up ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _node_lock(layout: Layout) -> Iterator[None]:
    """One ``up`` or ``down`` at a time per node (released by the kernel on exit)."""
    layout.run.mkdir(parents=True, exist_ok=True)
    fd = os.open(layout.run / "node.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"another 'azfs up' or 'azfs down' is working on {layout.root}"
                            ) from None
        yield
    finally:
        os.close(fd)


def up(root: Path, say: Say, **flags: object) -> Settings:
    """Brings the node up (or checks that it is); returns its settings."""
    if os.geteuid() != 0:
        raise UserError("azfs up must run as root (it mounts volumes and FUSE)")
    layout = Layout(root)
    # bad flags or no Azurite: an error before anything is created
    (layout.load_settings() or Settings()).merged(**flags).check()
    azurite_binary()
    layout.make_private_root()
    with _node_lock(layout):
        return _up(layout, say, flags)


def _up(layout: Layout, say: Say, flags: dict[str, object]) -> Settings:
    previous = layout.load_settings()
    settings = (previous or Settings()).merged(**flags).check()
    azurite = azurite_binary()
    running = {name: svc.pid() for name, svc in _known_services(layout, previous).items()}
    running = {name: pid for name, pid in running.items() if pid}
    if previous and running and settings != previous:
        raise UserError(f"the node in {layout.root} is running with other settings "
                        f"({', '.join(sorted(running))} up); run 'azfs down' first")
    layout.make_dirs()
    layout.save_settings(settings)
    write_configs(layout, settings)
    layout.storage_key_secret()
    table = services(layout, settings, azurite)
    started: list[str] = []
    try:
        for name in SERVICES:
            if name not in table:
                continue
            if name == "managerd":
                provision.ensure_admin(layout, table[name], say)
            if _ensure(table[name], ports(settings).get(name, []), say):
                started.append(name)
            if name == "etcd":
                provision.import_volumes(layout, settings, say)
            elif name == "azurite":
                provision.upload_sample(layout, settings, say)
            elif name == "managerd":
                provision.register_dataset(layout, settings, say)
    except BaseException:
        if started:
            say(f"cleaning up what this run started: {', '.join(reversed(started))}")
            for name in reversed(started):
                _stop(layout, name, table[name], say)
            if not any(svc.pid() for svc in table.values()):
                _unmount_all(layout)
        raise
    return settings


def _known_services(layout: Layout, settings: Settings | None) -> dict[str, Service]:
    """The services a node with ``settings`` may have running (all, if unknown)."""
    return services(layout, (settings or Settings()).merged(etcd="local"))


def _ensure(service: Service, ports: list[tuple[int, str]], say: Say) -> bool:
    """Starts ``service`` unless it runs already; True if this call started it."""
    pid = service.pid()
    if pid is not None:
        service.wait_ready(pid)
        say(f"{service.name}: already running (pid {pid})")
        return False
    for port, flag in ports:
        check_port_free(port, flag, service.name)
    say(f"{service.name}: starting (log {service.log})")
    pid = service.start()
    say(f"{service.name}: ready (pid {pid})")
    return True


def down(root: Path, say: Say, purge: bool = False) -> None:
    """Stops everything running from the state dir and unmounts everything below it."""
    if os.geteuid() != 0:
        raise UserError("azfs down must run as root (it unmounts)")
    layout = Layout(root)
    if not layout.root.exists():
        say(f"nothing to do: {layout.root} does not exist")
        return
    with _node_lock(layout):
        _down(layout, say)
    if purge:
        shutil.rmtree(layout.root)
        say(f"removed {layout.root}")
    say(f"azfs node in {layout.root} is down")


def _down(layout: Layout, say: Say) -> None:
    _remove_containers(layout, say)
    table = _known_services(layout, layout.load_settings())
    for name in reversed(SERVICES):
        if name in table:
            _stop(layout, name, table[name], say)
    _stop_strays(layout, say)
    _unmount_all(layout)
    layout.agent_socket.unlink(missing_ok=True)
    left = [e.mount_point for e in _mounts(layout)]
    if left:
        raise UserError(f"still mounted under {layout.root}: {', '.join(left)}")


def _stop(layout: Layout, name: str, service: Service, say: Say) -> None:
    if service.stop(timeout=30 if name == "agentd" else 20):
        say(f"{name}: stopped")
    if name == "agentd":
        # unmount_on_exit stops the FUSE process; one left behind (agent killed) goes here
        pid = procs.trusted_pid(layout.fusehost_pid_file, f"{layout.root}/")
        if pid is not None:
            procs.stop_pid(pid, "fusehost")
            say("fusehost: stopped")
        layout.fusehost_pid_file.unlink(missing_ok=True)


def _stop_strays(layout: Layout, say: Say) -> None:
    """Processes of this node without a pid file (e.g. an ``up`` killed after a start)."""
    # what each service's command line contains, exactly as `up` starts it
    signatures = {
        "agentd": f"-m agentd.main --config {layout.agent_toml} ",
        "fusehost": f"-m agentd.fusehost --mountpoint {layout.fuse_mountpoint} ",
        "managerd": f"-m managerd.main --config {layout.manager_toml} ",
        "azurite": f"--location {layout.azurite_data} ",
        "etcd": f"--data-dir {layout.etcd_data} ",
    }
    order = list(signatures)
    found: list[tuple[int, str, int]] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        line = procs.cmdline(int(entry.name))
        for name, signature in signatures.items():
            if signature in line:
                found.append((order.index(name), name, int(entry.name)))
                break
    for _, name, pid in sorted(found):
        if procs.alive(pid):
            procs.stop_pid(pid, name)
            say(f"{name}: stopped (pid {pid}, no pid file)")


def _remove_containers(layout: Layout, say: Say) -> None:
    """Kernel containers the demo (or a user) ran with the node's runc root."""
    if not layout.runc_root.is_dir() or shutil.which("runc") is None:
        return
    from azfs.containers.runc import Runc

    runtime = Runc(layout.runc_root)
    for container in runtime.list():
        runtime.delete(container["id"])
        say(f"container {container['id']}: removed")


def _mounts(layout: Layout):
    from azfs.volumes.mountinfo import mounts_under

    return mounts_under(layout.root)


def _unmount_all(layout: Layout) -> None:
    from azfs.volumes.hostmount import lazy_unmount

    for entry in sorted(_mounts(layout), key=lambda e: -len(e.mount_point)):
        lazy_unmount(entry.mount_point)


# ---- status -----------------------------------------------------------------------------
def status(root: Path) -> list[dict]:
    """Each service of the node: pid (None: not running) and whether it answers."""
    layout = Layout(root)
    settings = layout.load_settings()
    if settings is None:
        raise UserError(f"no azfs node in {layout.root} (run 'azfs up')")
    rows = []
    for name, service in services(layout, settings).items():
        pid = service.pid()
        rows.append({"service": name, "pid": pid, "ready": bool(pid) and service.ready(),
                     "log": str(service.log)})
    pid = procs.trusted_pid(layout.fusehost_pid_file, f"{layout.root}/")
    rows.append({"service": "fusehost", "pid": pid, "ready": bool(pid),
                 "log": str(layout.agent_state / "fusehost.log"),
                 "restarts": _restarts(layout.agent_state / "run" / "fusehost-restarts")})
    return rows


def volume_io(root: Path) -> dict[str, dict]:
    """The host volumes' I/O state as the node's agent reports it ({} if it does not answer)."""
    import httpx

    layout = Layout(root)
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(layout.agent_socket)),
                          timeout=5.0) as client:
            body = client.get("http://agent/v1/health").json()
    except (httpx.HTTPError, OSError, ValueError):
        return {}
    return body.get("volume_io", {}) if isinstance(body, dict) else {}


def _restarts(path: Path) -> int:
    """How often the agent restarted the fusehost (it keeps the count in its state dir)."""
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def usage_hint(layout: Layout, settings: Settings, user: str | None = None) -> str:
    """How to use and stop the node (no secret, only the token files' paths)."""
    state = "" if layout.root == Path("/var/lib/azfs/node") else f" --state-dir {layout.root}"
    token = layout.user_token(user) if user else layout.admin_token
    who = f"user '{user}'" if user else "the admin"
    return f"""\
The azfs node is running (state in {layout.root}).
  manager  {settings.manager_url}  (token of {who}: {token};
           admin token: {layout.admin_token})
  agent    '{settings.agent_id}' on {layout.agent_socket}, FUSE at {layout.fuse_mountpoint}
  blob     {settings.blob_endpoint}  (dataset '{SAMPLE_DATASET}')
Use it:
  export AZFS_MANAGER_URL={settings.manager_url} AZFS_TOKEN="$(cat {token})"
  azfs folder create mydata && azfs folder ls
  azfs kernel create k1 --agent {settings.agent_id} -v mydata -d {SAMPLE_DATASET}
  azfs kernel ls && azfs kernel rm k1
  azfs agent --socket {layout.agent_socket} status
  azfs folder info mydata --json      # its 'path' is a directory in volume 'local-share'
  azfs mount --ro {layout.share}/PATH /mnt/inspect   # inspect it; azfs umount /mnt/inspect
  AZURE_STORAGE_ACCOUNT={STORAGE_ACCOUNT} AZURE_STORAGE_KEY="$(cat {layout.storage_key})" \\
    AZURE_STORAGE_BLOB_ENDPOINT={settings.blob_endpoint} azfs dataset ls -r {SAMPLE_DATASET}
  azfs status{state}
Stop it (unmounts everything, stops every service):
  azfs down{state}"""


def add_state_dir_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="the node's state directory (default $AZFS_NODE_DIR or "
                             "/var/lib/azfs/node)")


def state_dir(args: argparse.Namespace) -> Path:
    from azfs.node.layout import DEFAULT_STATE_DIR

    return args.state_dir or Path(os.environ.get("AZFS_NODE_DIR") or DEFAULT_STATE_DIR)
