"""``azfs folder``: vfolders through the manager's REST API (create, ls, info, rm, share...).

The manager is ``--url`` or ``$AZFS_MANAGER_URL``; the token comes from
``--token-file`` or ``$AZFS_TOKEN`` (never a flag value, so it stays out of
``ps``).  Output is a table, or the API's JSON with ``--json``.  The REST
client is :mod:`azfs.client.manager`, the flags live in :mod:`azfs.cli.rest`.
"""

from __future__ import annotations

import argparse
import json
import sys

from azfs.cli.rest import add_client_flags, client_from_args, emit, emit_record, ref_path
from azfs.client.manager import create_vfolder, list_vfolders, vfolder_info
from azfs.errors import UserError

LIST_COLUMNS = [("alias", "alias"), ("id", "id"), ("owner", "owner"), ("access", "access"),
                ("status", "status"), ("volume", "volume"), ("quota_bytes", "quota")]
INFO_FIELDS = [("alias", "alias"), ("id", "id"), ("owner", "owner"), ("access", "your access"),
               ("status", "status"), ("volume", "volume"), ("usage_mode", "usage mode"),
               ("permission", "mounts as"), ("quota_bytes", "quota"),
               ("quota_files", "quota files"), ("usage.bytes", "used"),
               ("usage.files", "files"), ("shared_with", "shared with"),
               ("created_at", "created"), ("modified_at", "modified")]


def _create(args: argparse.Namespace) -> int:
    data = create_vfolder(client_from_args(args), args.alias, usage_mode=args.usage_mode,
                          permission="ro" if args.ro else "rw", dotfolder=args.dotfolder,
                          volume=args.volume)
    emit(args, data, LIST_COLUMNS)
    return 0


def _ls(args: argparse.Namespace) -> int:
    data = list_vfolders(client_from_args(args), all=args.all, trash=args.trash)
    emit(args, data, LIST_COLUMNS, title="trash" if args.trash else None)
    return 0


def _info(args: argparse.Namespace) -> int:
    data = vfolder_info(client_from_args(args), args.ref)
    emit_record(args, data, INFO_FIELDS)
    if not args.json and data.get("usage") is None and data.get("usage_error"):
        print(f"usage unknown: {data['usage_error']['message']}", file=sys.stderr)
    return 0


def _rename(args: argparse.Namespace) -> int:
    data = client_from_args(args).call(
        "PATCH", f"/v1/vfolders/{ref_path(args.ref)}",
        {"alias": args.new_alias, "dotfolder": args.dotfolder})
    emit(args, data, LIST_COLUMNS)
    return 0


def _rm(args: argparse.Namespace) -> int:
    client = client_from_args(args)
    path = f"/v1/vfolders/{ref_path(args.ref)}"
    if args.purge:
        info = client.call("GET", path, params=None) if not _is_id(args.ref) else None
        vfid = info["id"] if info else args.ref
        client.call("DELETE", f"/v1/vfolders/{vfid}")
        client.call("POST", f"/v1/vfolders/{vfid}/purge")
    else:
        client.call("DELETE", path)
    if args.json:
        print(json.dumps({"ref": args.ref, "purged": args.purge}))
    else:
        print(f"{args.ref}: {'purged' if args.purge else 'moved to the trash'}")
    return 0


def _is_id(ref: str) -> bool:
    import uuid
    try:
        uuid.UUID(ref)
    except ValueError:
        return False
    return len(ref) in (32, 36)


def _restore(args: argparse.Namespace) -> int:
    data = client_from_args(args).call(
        "POST", f"/v1/vfolders/{ref_path(args.ref)}/restore")
    emit(args, data, LIST_COLUMNS)
    return 0


def _share(args: argparse.Namespace) -> int:
    data = client_from_args(args).call(
        "PUT", f"/v1/vfolders/{ref_path(args.ref)}/shares/{ref_path(args.user)}",
        {"permission": args.permission})
    emit(args, data, [("alias", "alias"), ("id", "id"), ("shared_with", "shared with")])
    return 0


def _unshare(args: argparse.Namespace) -> int:
    client_from_args(args).call(
        "DELETE", f"/v1/vfolders/{ref_path(args.ref)}/shares/{ref_path(args.user)}")
    if args.json:
        print(json.dumps({"ref": args.ref, "user": args.user, "shared": False}))
    else:
        print(f"{args.ref}: no longer shared with {args.user}")
    return 0


def _quota(args: argparse.Namespace) -> int:
    if args.bytes is None and args.files is None:
        raise UserError("give --bytes and/or --files (0 means unlimited)")
    data = client_from_args(args).call(
        "PUT", f"/v1/vfolders/{ref_path(args.ref)}/quota",
        {"quota_bytes": args.bytes, "quota_files": args.files})
    emit(args, data, [("alias", "alias"), ("quota_bytes", "quota bytes"),
                      ("quota_files", "quota files")])
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("folder", help="vfolders (through the manager)",
                                   description=__doc__.splitlines()[0].replace("``", ""))
    sub = parser.add_subparsers(dest="folder_command", metavar="ACTION", required=True)

    p = sub.add_parser("create", help="create a vfolder")
    p.add_argument("alias")
    p.add_argument("--volume", help="host volume (default: the one with most free space)")
    p.add_argument("--usage-mode", choices=["general", "data", "model"], default="general")
    p.add_argument("--ro", action="store_true", help="mount read-only in your kernels")
    p.add_argument("--dotfolder", action="store_true",
                   help="allow a reserved dot-name such as .ssh")
    p.set_defaults(func=_create)

    p = sub.add_parser("ls", help="list your own and shared vfolders")
    p.add_argument("--all", action="store_true", help="every vfolder (admins)")
    p.add_argument("--trash", action="store_true", help="list the trash instead")
    p.set_defaults(func=_ls)

    p = sub.add_parser("info", help="details and usage of a vfolder")
    p.add_argument("ref", help="alias or id")
    p.set_defaults(func=_info)

    p = sub.add_parser("rename", help="rename a vfolder")
    p.add_argument("ref")
    p.add_argument("new_alias")
    p.add_argument("--dotfolder", action="store_true")
    p.set_defaults(func=_rename)

    p = sub.add_parser("rm", help="move a vfolder to the trash (--purge: delete for good)")
    p.add_argument("ref")
    p.add_argument("--purge", action="store_true", help="also remove its data")
    p.set_defaults(func=_rm)

    p = sub.add_parser("restore", help="take a vfolder out of the trash")
    p.add_argument("ref")
    p.set_defaults(func=_restore)

    p = sub.add_parser("share", help="share a vfolder with a user")
    p.add_argument("ref")
    p.add_argument("user")
    p.add_argument("--permission", choices=["ro", "rw", "rw-delete"], default="ro")
    p.set_defaults(func=_share)

    p = sub.add_parser("unshare", help="stop sharing a vfolder with a user")
    p.add_argument("ref")
    p.add_argument("user")
    p.set_defaults(func=_unshare)

    p = sub.add_parser("quota", help="set a vfolder's quota (admins)")
    p.add_argument("ref")
    p.add_argument("--bytes", type=int)
    p.add_argument("--files", type=int)
    p.set_defaults(func=_quota)

    for action in sub.choices.values():
        add_client_flags(action)
