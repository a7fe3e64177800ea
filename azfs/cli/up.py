"""``azfs up|down|status|demo``: a whole azfs node on this machine, on embedded defaults.

``up`` starts managerd (SQLite), Azurite with a sample dataset, agentd with
its FUSE mount (and etcd with ``--etcd local``), detached, under one state
directory; ``down`` stops them and unmounts everything below that directory.
Secrets stay in 0600 files there; only their paths are printed.
"""

from __future__ import annotations

import argparse
import sys

from azfs.cli.agent import volume_io_lines
from azfs.node import deploy
from azfs.node.layout import Layout


def _say(text: str) -> None:
    print(text, flush=True)


def _up(args: argparse.Namespace) -> int:
    root = deploy.state_dir(args)
    etcd = args.etcd
    settings = deploy.up(root, _say, manager_port=args.manager_port,
                         azurite_port=args.azurite_port, etcd=etcd,
                         etcd_port=args.etcd_port,
                         etcd_peer_port=args.etcd_port + 1 if args.etcd_port else None,
                         agent_id=args.agent_id)
    if not args.quiet:
        _say("")
        _say(deploy.usage_hint(Layout(root), settings))
    return 0


def _down(args: argparse.Namespace) -> int:
    deploy.down(deploy.state_dir(args), _say, purge=args.purge)
    return 0


def _status(args: argparse.Namespace) -> int:
    rows = deploy.status(deploy.state_dir(args))
    width = max(len(r["service"]) for r in rows)
    for row in rows:
        state = ("ready" if row["ready"] else "not answering") if row["pid"] else "stopped"
        pid = f"pid {row['pid']}" if row["pid"] else ""
        restarts = f"  restarts {row['restarts']}" if "restarts" in row else ""
        print(f"{row['service']:<{width}}  {state:<14} {pid:<11} {row['log']}{restarts}")
    degraded = False
    for name, volume in sorted(deploy.volume_io(deploy.state_dir(args)).items()):
        degraded |= volume.get("state") != "healthy"
        print(f"volume {volume_io_lines({name: volume})[0]}")
    if degraded:
        return 1
    return 0 if all(r["ready"] for r in rows if r["pid"]) and any(r["pid"] for r in rows) \
        else 1


def _demo(args: argparse.Namespace) -> int:
    from azfs.node.demo import USER, run_demo

    layout = Layout(deploy.state_dir(args))
    run_demo(layout, _say)
    settings = layout.load_settings()
    _say("\nThe demo is done; the node keeps running.\n")
    _say(deploy.usage_hint(layout, settings, user=USER))
    sys.stdout.flush()
    return 0


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be 1-65535")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("up", help="start a single-node azfs (manager, agent, Azurite)",
                              description=__doc__.split("\n\n")[1].replace("``", "'"))
    deploy.add_state_dir_flag(p)
    p.add_argument("--manager-port", type=_port, help="manager REST port (default 8630)")
    p.add_argument("--azurite-port", type=_port, help="Azurite blob port (default 10000)")
    p.add_argument("--etcd", metavar="HOST:PORT|local|none",
                   help="keep the volume config in etcd ('local': start one for this node; "
                        "'none': back to the YAML file); remembered by later runs")
    p.add_argument("--etcd-port", type=_port,
                   help="with --etcd local: client port (default 12379; peer port +1)")
    p.add_argument("--agent-id", help="the agent's name (default 'local')")
    p.add_argument("--quiet", action="store_true", help="do not print how to use the node")
    p.set_defaults(func=_up)

    p = subparsers.add_parser(
        "down", help="stop the single-node azfs and unmount everything",
        description="Stop every service 'azfs up' started from the state dir (also after a "
                    "failed or interrupted 'up') and unmount everything below it.")
    deploy.add_state_dir_flag(p)
    p.add_argument("--purge", action="store_true",
                   help="also delete the state directory (every vfolder and dataset in it)")
    p.set_defaults(func=_down)

    p = subparsers.add_parser(
        "status", help="the single-node azfs's services",
        description="List the node's services; exit status 1 if one is not answering.")
    deploy.add_state_dir_flag(p)
    p.set_defaults(func=_status)

    p = subparsers.add_parser("demo", help="show azfs at work on the single-node azfs "
                              "(user, vfolder, two runc kernels, a dataset)")
    deploy.add_state_dir_flag(p)
    p.set_defaults(func=_demo)
