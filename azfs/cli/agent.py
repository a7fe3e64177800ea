"""``azfs agent status|kernels|volumes|restart-fuse``: the node agent, from its socket.

A thin client of the agent's control API (``/v1/health``, ``/v1/kernels``,
``/v1/volumes``, ``/v1/fuse/restart``); ``--json`` prints the API's answer
unchanged for scripts.  ``restart-fuse`` replaces the node's FUSE process
(after installing a new azfs) and re-binds every running kernel's vfolders.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import httpx

from azfs.errors import UserError

ENV_SOCKET = "AZFS_AGENT_SOCKET"
DEFAULT_SOCKET = Path("/run/azfs/agent.sock")
TIMEOUT = 30.0
#: a restart stops the old process (up to 30 s), starts one and re-binds every kernel
RESTART_TIMEOUT = 180.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="show the node agent's state (via its control socket)",
                       description="Query the node agent's control socket.")
    p.add_argument("--socket", type=Path, default=None,
                   help=f"control socket (default ${ENV_SOCKET} or {DEFAULT_SOCKET})")
    p.add_argument("--json", action="store_true", help="print the API's JSON answer")
    what = p.add_subparsers(dest="agent_command", metavar="WHAT", required=True)
    what.add_parser("status", help="health of the agent, its FUSE mount and volumes") \
        .set_defaults(func=cmd_status)
    what.add_parser("kernels", help="kernels with exports on this node") \
        .set_defaults(func=cmd_kernels)
    what.add_parser("volumes", help="host volumes with their refcounts") \
        .set_defaults(func=cmd_volumes)
    unexport = what.add_parser("unexport", help="remove a kernel's exports on this node "
                               "(normally the manager does this)")
    unexport.add_argument("kernel_id", metavar="KERNEL_ID")
    unexport.set_defaults(func=cmd_unexport)
    what.add_parser("restart-fuse", help="replace the FUSE process (an upgrade); running "
                    "kernels keep their vfolders").set_defaults(func=cmd_restart_fuse)


def _socket(args: argparse.Namespace) -> Path:
    return args.socket or Path(os.environ.get(ENV_SOCKET) or DEFAULT_SOCKET)


def get(args: argparse.Namespace, path: str, method: str = "GET",
        timeout: float = TIMEOUT) -> tuple[int, Any]:
    sock = _socket(args)
    if not sock.exists():
        raise UserError(f"no agent socket at {sock} (is azfs-agentd running? --socket?)")
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)),
                          base_url="http://agent", timeout=timeout) as client:
            response = client.request(method, path)
    except httpx.HTTPError as exc:
        raise UserError(f"cannot reach the agent at {sock}: {exc}") from None
    if response.status_code == 204:
        return 204, None
    try:
        body = response.json()
    except ValueError:
        raise UserError(f"the agent answered {response.status_code} without JSON") from None
    if response.status_code >= 400 and response.status_code != 503:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        raise UserError(f"the agent answered {response.status_code}: "
                        f"{error.get('message', body)}")
    return response.status_code, body


def cmd_status(args: argparse.Namespace) -> int:
    status, body = get(args, "/v1/health")
    if args.json:
        print(json.dumps(body, indent=2))
        return 0 if status == 200 else 1
    fuse = body.get("fuse", {})
    print(f"agent      {body.get('agent_id')}  {body.get('status')}  "
          f"up {body.get('uptime', 0):.0f}s")
    print(f"fuse       {fuse.get('mountpoint')}  {fuse.get('state')}  "
          f"pid {fuse.get('pid', '-')}  views {fuse.get('views', '-')}  "
          f"restarts {fuse.get('restarts', 0)}")
    if fuse.get("error"):
        print(f"           {fuse['error']}")
    if fuse.get("last_restart"):
        last = fuse["last_restart"]
        print(f"           last restart: {last.get('reason')}, binds back after "
              f"{last.get('window', 0):.2f}s")
    print(f"kernels    {body.get('kernels')}")
    for kernel_id, binds in sorted(body.get("kernel_binds", {}).items()):
        states = binds.get("binds", {})
        bad = ", ".join(f"{rel} {state}" for rel, state in sorted(states.items())
                        if state != "live")
        print(f"  {kernel_id}  binds {'live' if binds.get('live') else 'NOT LIVE'}"
              + (f" ({bad})" if bad else f" ({len(states)})"))
    for label, d in sorted((fuse.get("datasets") or {}).items()):
        print(f"dataset    {label}  data GETs {d.get('data_gets', 0)}  HEADs "
              f"{d.get('heads', 0)}  listings {d.get('lists', 0)}  cache hits "
              f"{d.get('cache_hits', 0)}  received {d.get('bytes', 0)} bytes")
    volumes = body.get("volumes", {})
    print("volumes    " + (", ".join(f"{n} ({r})" for n, r in sorted(volumes.items()))
                           or "none mounted"))
    for line in volume_io_lines(body.get("volume_io", {})):
        print(f"io         {line}")
    for name, error in sorted(body.get("startup_failures", {}).items()):
        print(f"failed     {name}: {error}")
    return 0 if status == 200 else 1


def volume_io_lines(volume_io: dict) -> list[str]:
    """One line per host volume: state, threads, calls in flight, timeouts, mean latency."""
    lines = []
    for name, v in sorted(volume_io.items()):
        calls = sum(v.get("buckets", [])) or 0
        mean = f"{v.get('seconds', 0) / calls * 1000:.2f} ms" if calls else "-"
        lines.append(f"{name}  {v.get('state')}  {v.get('mode')}  workers "
                     f"{v.get('threads', 0)}/{v.get('max_threads', 0)}  in flight "
                     f"{v.get('in_flight', 0)}  stuck {v.get('stuck', 0)}  timeouts "
                     f"{v.get('timeouts', 0)}  refused {v.get('rejected', 0)}  mean {mean}")
    return lines


def cmd_kernels(args: argparse.Namespace) -> int:
    _, body = get(args, "/v1/kernels")
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    kernels = body.get("kernels", [])
    if not kernels:
        print("no kernels")
    for kernel in kernels:
        vfolders = ", ".join(f"{v['alias']}:{v['mode']}" for v in kernel["vfolders"])
        print(f"{kernel['kernel_id']}  {vfolders or '-'}")
    return 0


def cmd_volumes(args: argparse.Namespace) -> int:
    _, body = get(args, "/v1/volumes")
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    rows = [("NAME", "FSTYPE", "AT", "MOUNTED", "REFS")]
    for v in body.get("volumes", []):
        rows.append((v["name"], v.get("fstype") or "-", v.get("at") or "-",
                     "yes" if v["mounted"] else "no", str(v["refcount"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_unexport(args: argparse.Namespace) -> int:
    get(args, f"/v1/kernels/{args.kernel_id}", method="DELETE")
    if args.json:
        print(json.dumps({"kernel_id": args.kernel_id, "unexported": True}))
    else:
        print(f"kernel {args.kernel_id}: no exports left on this node")
    return 0


def cmd_restart_fuse(args: argparse.Namespace) -> int:
    status, body = get(args, "/v1/fuse/restart", method="POST", timeout=RESTART_TIMEOUT)
    if status != 200:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        raise UserError(f"the agent answered {status}: {error.get('message', body)}")
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        print(f"fusehost restarted: pid {body.get('old_pid')} -> {body.get('pid')}; "
              f"{body.get('views')} views, {body.get('rebound')} binds re-bound, "
              f"back after {body.get('window', 0):.2f}s")
    return 0 if not body.get("failed") else 1
