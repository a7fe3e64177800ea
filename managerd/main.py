"""``azfs-managerd``: serve the manager's REST API, migrate, or bootstrap users.

``azfs-managerd [serve]`` applies migrations, then serves on hypercorn's trio
worker until SIGTERM/SIGINT; ``migrate`` only migrates; ``create-user NAME
[--admin]`` creates a user and prints its first token (the way to make the
first admin); ``issue-token NAME`` prints a new token for a user (a lost
admin token).  The database URL (which may hold a password) is read from the
config file or ``AZFS_MANAGERD_DATABASE_URL``, never from a flag.

With ``tls_cert_file``/``tls_key_file`` the API is served over TLS only (the
files are checked before anything starts).  The state dir, which holds the
SQLite database and the manager's volume mounts, is made root-only (0700)
at every start.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from azfs import __version__
from azfs.errors import AzfsError
from azfs.hostdirs import ensure_private_dir
from azfs.logs import setup_logging
from azfs.secret import redact
from managerd.app import create_app
from managerd.auth import issue_token
from managerd.config import ManagerConfig
from managerd.errors import ApiError
from managerd.services.users import create_user, get_user
from managerd.state import Manager

log = logging.getLogger("managerd")
SHUTDOWN_GRACE = 10.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="azfs-managerd",
                                     description="azfs manager: vfolders, datasets, kernels")
    parser.add_argument("--config", type=Path, help="TOML config file")
    parser.add_argument("--listen", help="HOST:PORT to serve on (default 127.0.0.1:8630)")
    parser.add_argument("--state-dir", type=Path, help="state directory (SQLite db, mounts)")
    parser.add_argument("--volumes-file", type=Path, help="YAML volume config")
    parser.add_argument("--etcd", help="etcd HOST:PORT holding the volume config")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--version", action="version", version=f"azfs-managerd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("serve", help="serve the REST API (default)")
    sub.add_parser("migrate", help="apply database migrations and exit")
    user = sub.add_parser("create-user", help="create a user and print its first token")
    user.add_argument("name")
    user.add_argument("--admin", action="store_true")
    user.add_argument("--uid", type=int, default=1000)
    user.add_argument("--gid", type=int, default=1000)
    token = sub.add_parser("issue-token",
                           help="print a new token for an existing user (e.g. a lost admin token)")
    token.add_argument("name")
    token.add_argument("--label", default="cli")
    return parser


def load_config(args: argparse.Namespace) -> ManagerConfig:
    overrides = {"state_dir": args.state_dir, "volumes_file": args.volumes_file,
                 "etcd": args.etcd, "log_level": args.log_level}
    if args.listen:
        host, _, port = args.listen.rpartition(":")
        overrides.update(listen_host=host.strip("[]") or "127.0.0.1", listen_port=port)
    return ManagerConfig.load(args.config, overrides=overrides)


async def serve(config: ManagerConfig, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Runs the manager until SIGTERM/SIGINT (or cancellation)."""
    if config.tls:
        from azfs.tls import check_server_files

        check_server_files(config.tls_cert_file, config.tls_key_file, None, "manager TLS")
    manager = Manager(config)
    await manager.start()
    hc = HypercornConfig()
    host = config.listen_host
    hc.bind = [f"[{host}]:{config.listen_port}" if ":" in host else
               f"{host}:{config.listen_port}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")  # our handler only, not a second one
    hc.graceful_timeout = SHUTDOWN_GRACE
    if config.tls:
        hc.certfile, hc.keyfile = str(config.tls_cert_file), str(config.tls_key_file)
    elif host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("serving on %s without TLS: bearer tokens cross the network in clear; "
                    "set tls_cert_file and tls_key_file", hc.bind[0])

    async def shutdown_trigger() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal %s: shutting down", signal.Signals(signum).name)
                return

    try:
        log.info("serving on %s (database %s)", hc.bind[0],
                 redact(manager.db.url.render_as_string(hide_password=True)))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(manager.leader.run, manager.leader_work)
            try:
                await hypercorn_serve(create_app(manager), hc,
                                      shutdown_trigger=shutdown_trigger, task_status=task_status)
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.move_on_after(SHUTDOWN_GRACE) as scope:
            scope.shield = True
            await manager.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args)
        setup_logging(getattr(logging, config.log_level.upper(), logging.INFO))
        ensure_private_dir(config.state_dir, "manager state_dir")
        command = args.command or "serve"
        if command == "migrate":
            Manager(config).migrate()
            return 0
        if command == "create-user":
            manager = Manager(config)
            manager.migrate()
            user, token = manager.db.call(
                lambda s: create_user(s, args.name, admin=args.admin, uid=args.uid,
                                      gid=args.gid))
            print(json.dumps({**user, "token": token}))
            return 0
        if command == "issue-token":
            manager = Manager(config)
            manager.migrate()

            def issue(session) -> dict:
                user = get_user(session, args.name)
                return {"user": user.name, "label": args.label,
                        "token": issue_token(session, user.id, args.label)}

            print(json.dumps(manager.db.call(issue)))
            return 0
        trio.run(serve, config)
        return 0
    except ApiError as exc:
        print(f"azfs-managerd: {exc.message}", file=sys.stderr)
        return 1
    except AzfsError as exc:
        print(f"azfs-managerd: {redact(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the edge: one line, details in the log
        logging.getLogger("managerd").debug("fatal", exc_info=True)
        print(f"azfs-managerd: {redact(str(exc)) or type(exc).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
