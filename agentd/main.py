"""``azfs-agentd``: the node daemon.

Start: read the config, take the state dir's lock (one agent per node), mount
the ``startup`` volumes, reuse the running fusehost (or clean a stale FUSE
mount and start a new one), restore the journal's exports, register in etcd
(when configured), serve the control API on the unix socket (mode 0660) and,
if configured, on TCP for a remote manager (bearer token; TLS when a
certificate is configured, with client certificates for mutual TLS).

Before anything else the directories under which the agent mounts (its
state dir with the volume mounts, the FUSE mountpoint's parent, the block
cache) are made root-only: a looser mode is fixed with a warning, a
directory of another owner is refused.

SIGTERM/SIGINT: stop taking requests (in-flight ones finish within a grace
period), revoke the registration, keep the journal.  By default the FUSE
process and the host volumes are left running: containers keep their
mounts, and the next agent start reattaches to them without a gap.  This is
the point of running the filesystem in a process of its own -- an agent
upgrade or crash must never turn every container's ``/home/work`` into
``ENOTCONN``.  With ``--unmount-on-exit`` (or ``unmount_on_exit = true``)
the agent also stops the fusehost, which unmounts, and unmounts every host
volume: for decommissioning a node, once its kernels are gone.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import signal
import socket
import ssl
import sys
from pathlib import Path

import trio

from agentd.config import DEFAULT_CONFIG, Config
from azfs.errors import AzfsError, UserError
from azfs.hostdirs import ensure_private_dir
from azfs.logs import setup_logging
from azfs.secret import redact
from azfs.sockets import bind_unix

log = logging.getLogger("agentd")

GRACE_SECONDS = 10.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="azfs-agentd", description="azfs node agent")
    p.add_argument("--config", type=Path, default=None,
                   help=f"TOML config file (default {DEFAULT_CONFIG} if it exists)")
    p.add_argument("--state-dir", type=Path, default=None)
    p.add_argument("--socket", type=Path, default=None)
    p.add_argument("--volumes-file", type=Path, default=None)
    p.add_argument("--etcd", default=None, metavar="HOST:PORT")
    p.add_argument("--unmount-on-exit", action="store_true", default=None,
                   help="on SIGTERM also unmount the FUSE filesystem and the host volumes")
    p.add_argument("--debug", action="store_true", default=None)
    return p


def load_config(args: argparse.Namespace) -> Config:
    path = args.config
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    config = Config.from_toml(path) if path is not None else Config()
    if args.etcd and config.volumes_file and not args.volumes_file:
        config = config.with_overrides(volumes_file=None)
    return config.with_overrides(state_dir=args.state_dir, socket=args.socket,
                                 volumes_file=args.volumes_file, etcd=args.etcd,
                                 unmount_on_exit=args.unmount_on_exit, debug=args.debug)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args)
    except UserError as exc:
        print(f"azfs-agentd: {redact(str(exc))}", file=sys.stderr)
        return 1
    setup_logging(logging.DEBUG if config.debug else logging.INFO)
    try:
        trio.run(run, config)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # noqa: BLE001 - the edge: one line, no traceback
        error = _single(exc)
        if isinstance(error, KeyboardInterrupt):
            return 130
        if not isinstance(error, Exception):
            raise
        if isinstance(error, UserError | AzfsError):
            log.error("%s", redact(str(error)))
        else:
            log.error("agent failed: %s", redact(str(error)) or type(error).__name__,
                      exc_info=config.debug)
        return 1
    return 0


def _single(exc: BaseException) -> BaseException:
    """The one error inside (nested) exception groups of one error."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


@contextlib.contextmanager
def state_lock(config: Config):
    """One agent per state dir; released by the kernel even after kill -9."""
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(config.state_dir / "agent.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(f"another agent is running with state dir {config.state_dir}") from None
    try:
        yield
    finally:
        os.close(fd)


def secure_host_dirs(config: Config) -> None:
    """Root-only (0700) directories above every mount of the agent.

    The FUSE mountpoint's parent is fixed only when it is inside the state dir;
    one elsewhere belongs to the operator and a loose one is refused.
    """
    ensure_private_dir(config.state_dir, "agent state_dir")
    ensure_private_dir(config.state_dir / "volumes", "agent volume mount directory")
    parent = config.mountpoint.parent
    ensure_private_dir(parent, "the FUSE mountpoint's parent directory",
                       fix=config.state_dir in (parent, *parent.parents))
    if config.cache_dir is not None:
        ensure_private_dir(config.cache_dir, "block cache dir")


def check_tls(config: Config) -> None:
    """The TCP listener's TLS files load (or one clear error); plain TCP is warned about."""
    if not config.manager_listen:
        return
    if not config.manager_tls:
        log.warning("manager.listen %s without TLS: the bearer secret and the export "
                    "requests cross the network in clear; set manager.cert_file and "
                    "manager.key_file", config.manager_listen)
        return
    from azfs.tls import check_server_files

    check_server_files(config.manager_cert_file, config.manager_key_file,
                       config.manager_client_ca_file, "manager TLS")


async def run(config: Config) -> None:
    from agentd.agent import Agent
    from agentd.registration import Registration

    secure_host_dirs(config)
    check_tls(config)
    with state_lock(config):
        agent = Agent(config)
        await agent.start()
        stop = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_on_signals, stop)
                nursery.start_soon(agent.run_watchdog)
                nursery.start_soon(Registration(config).run)
                async with trio.open_nursery() as servers:
                    await servers.start(serve_unix, agent, stop)
                    if config.manager_listen:
                        await servers.start(serve_tcp, agent, stop)
                    log.info("serving %s", config.socket)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                config.socket.unlink(missing_ok=True)
                await agent.shutdown(config.unmount_on_exit)
        log.info("agent stopped (%s)", "unmounted" if config.unmount_on_exit
                 else "FUSE mount and volumes left in place")


async def _on_signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("%s: no longer taking requests", signal.Signals(signum).name)
            stop.set()
            return


def _hypercorn_config(bind: str):
    from hypercorn.config import Config as HyperConfig

    hc = HyperConfig()
    hc.bind = [bind]
    hc.graceful_timeout = GRACE_SECONDS
    hc.accesslog = None
    hc.errorlog = logging.getLogger("agentd.http")
    if not hc.errorlog.isEnabledFor(logging.DEBUG):
        hc.errorlog.setLevel(logging.WARNING)  # "Running on ..." names the temporary socket
    hc.keep_alive_timeout = 30
    return hc


def unix_listener(config: Config) -> socket.socket:
    """The control socket, created under a temporary name and renamed into place
    once its mode and group are right (no window where it is too open)."""
    path = config.socket
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    return bind_unix(path, config.socket_mode, config.socket_gid)


async def serve_unix(agent, stop: trio.Event,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    from hypercorn.trio import serve

    from agentd.api import BodyLimit, create_app

    sock = unix_listener(agent.config)
    app = BodyLimit(create_app(agent), agent.config.max_body_bytes)
    hc = _hypercorn_config(f"fd://{sock.detach()}")
    await serve(app, hc, shutdown_trigger=stop.wait, task_status=task_status)


async def serve_tcp(agent, stop: trio.Event,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    from hypercorn.trio import serve

    from agentd.api import BearerAuth, BodyLimit, create_app

    config = agent.config
    secret = config.manager_secret()
    app = BearerAuth(BodyLimit(create_app(agent), config.max_body_bytes), secret)
    hc = _hypercorn_config(config.manager_listen)
    if config.manager_tls:
        hc.certfile, hc.keyfile = str(config.manager_cert_file), str(config.manager_key_file)
        if config.manager_client_ca_file is not None:
            hc.ca_certs = str(config.manager_client_ca_file)
            hc.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: no certificate, no request
    await serve(app, hc, shutdown_trigger=stop.wait, task_status=task_status)


if __name__ == "__main__":
    sys.exit(main())
