"""``azfs kernel``: ask the manager to export vfolders and datasets to a kernel, or drop them.

``-v REF[:TARGET][:ro|rw]`` adds a vfolder (TARGET relative to /home/work
unless absolute), ``-d DATASET[:TARGET]`` a dataset.  ``create`` prints the
bind mounts the container runtime must apply (``--json``: the whole kernel
record, its ``mounts`` included; ``--docker``: the same mounts as ``docker
run`` arguments).  ``attach``/``detach`` add a vfolder to a running kernel
or take one away; it appears or disappears inside the running container.
"""

from __future__ import annotations

import argparse
import json
import shlex

from azfs.cli.rest import add_client_flags, client_from_args, emit, emit_record, ref_path
from azfs.client.manager import create_kernel, destroy_kernel

COLUMNS = [("kernel_id", "kernel"), ("owner", "owner"), ("agent", "agent"),
           ("status", "status"), ("created_at", "created")]
MOUNT_COLUMNS = [("destination", "container path"), ("source", "source"),
                 ("options", "options")]


def docker_mount_args(kernel: dict) -> list[str]:
    """The kernel's mounts as ``docker run --mount`` arguments (propagation included)."""
    from azfs.containers.docker import mount_args
    from azfs.containers.spec import KernelSpec
    from azfs.export import ExportResponse

    export = ExportResponse.model_validate({"kernel_id": kernel["kernel_id"],
                                            "mounts": kernel["mounts"]})
    return mount_args(KernelSpec.from_export(export, ["true"]))


def show_mounts(args: argparse.Namespace, kernel: dict) -> None:
    """The kernel's bind mounts as a table (or the whole record with ``--json``)."""
    if getattr(args, "docker", False):
        print(shlex.join(docker_mount_args(kernel)))
    elif args.json:
        emit(args, kernel, COLUMNS)  # the full record, ``mounts`` included
    else:
        emit(args, kernel["mounts"], MOUNT_COLUMNS, title=f"kernel {kernel['kernel_id']}")


def _create(args: argparse.Namespace) -> int:
    kernel = create_kernel(client_from_args(args), args.kernel_id, args.agent,
                           args.vfolder, args.dataset, dotfolders=not args.no_dotfolders,
                           owner=args.owner)
    show_mounts(args, kernel)
    return 0


def _ls(args: argparse.Namespace) -> int:
    emit(args, client_from_args(args).call("GET", "/v1/kernels",
                                                  params={"all": args.all}), COLUMNS)
    return 0


def _info(args: argparse.Namespace) -> int:
    data = client_from_args(args).call("GET", f"/v1/kernels/{ref_path(args.kernel_id)}")
    if args.docker:
        print(shlex.join(docker_mount_args(data)))
        return 0
    emit_record(args, data, COLUMNS)
    if not args.json:
        emit(args, data["vfolders"], [("alias", "alias"), ("kind", "kind"), ("mode", "mode"),
                                      ("target", "target")])
    return 0


def _attach(args: argparse.Namespace) -> int:
    item: dict = {"vfolder": args.vfolder}
    if args.path:
        item["target"] = args.path
    if args.ro:
        item["mode"] = "ro"
    kernel = client_from_args(args).call(
        "POST", f"/v1/kernels/{ref_path(args.kernel_id)}/vfolders", item)
    if args.json:
        emit(args, kernel, COLUMNS)
    else:
        mount = next((v for v in kernel["vfolders"]
                      if args.vfolder in (v["alias"], v["vfolder_id"])), None)
        where = mount["target"] if mount else "its path"
        print(f"{args.kernel_id}: {args.vfolder} attached at {where}")
    return 0


def _detach(args: argparse.Namespace) -> int:
    kernel = client_from_args(args).call(
        "DELETE", f"/v1/kernels/{ref_path(args.kernel_id)}/vfolders/{ref_path(args.vfolder)}")
    if args.json:
        emit(args, kernel, COLUMNS)
    else:
        print(f"{args.kernel_id}: {args.vfolder} detached")
    return 0


def _rm(args: argparse.Namespace) -> int:
    destroy_kernel(client_from_args(args), args.kernel_id, force=args.force)
    if args.json:
        print(json.dumps({"kernel_id": args.kernel_id, "destroyed": True}))
    else:
        print(f"{args.kernel_id}: exports dropped")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("kernel", help="kernel exports (through the manager)",
                                   description=__doc__.splitlines()[0].replace("``", ""))
    sub = parser.add_subparsers(dest="kernel_command", metavar="ACTION", required=True)

    p = sub.add_parser("create", help="export vfolders/datasets to a kernel on an agent")
    p.add_argument("kernel_id")
    p.add_argument("--agent", required=True, help="the node agent that runs the kernel")
    p.add_argument("-v", "--vfolder", action="append", default=[],
                   metavar="REF[:TARGET][:ro|rw]")
    p.add_argument("-d", "--dataset", action="append", default=[], metavar="NAME[:TARGET]")
    p.add_argument("--no-dotfolders", action="store_true",
                   help="do not add your dot-folders automatically")
    p.add_argument("--owner", help="admins: the user the kernel runs for")
    p.add_argument("--docker", action="store_true",
                   help="print the mounts as 'docker run' --mount arguments")
    p.set_defaults(func=_create)

    p = sub.add_parser("attach", help="add a vfolder to a running kernel")
    p.add_argument("kernel_id", metavar="KERNEL")
    p.add_argument("vfolder", metavar="VFOLDER", help="vfolder id or alias")
    p.add_argument("--path", help="container path (default /home/work/<alias>; relative "
                                  "paths are under /home/work)")
    p.add_argument("--ro", action="store_true", help="read-only")
    p.set_defaults(func=_attach)

    p = sub.add_parser("detach", help="take a vfolder away from a running kernel")
    p.add_argument("kernel_id", metavar="KERNEL")
    p.add_argument("vfolder", metavar="VFOLDER", help="the vfolder's alias in the kernel")
    p.set_defaults(func=_detach)

    p = sub.add_parser("ls", help="list your kernels")
    p.add_argument("--all", action="store_true", help="every kernel (admins)")
    p.set_defaults(func=_ls)

    p = sub.add_parser("info", help="a kernel's exports")
    p.add_argument("kernel_id")
    p.add_argument("--docker", action="store_true",
                   help="print the mounts as 'docker run' --mount arguments")
    p.set_defaults(func=_info)

    p = sub.add_parser("rm", help="drop a kernel's exports (destroying twice is fine)")
    p.add_argument("kernel_id")
    p.add_argument("--force", action="store_true",
                   help="admins: forget the kernel even if its agent is unreachable")
    p.set_defaults(func=_rm)

    for action in sub.choices.values():
        add_client_flags(action)
