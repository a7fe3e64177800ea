"""``azfs user``: users and their API tokens, through the manager's REST API.

Admins create, list, change users and issue or revoke anyone's tokens; any
user may ask who they are and manage their own tokens.  A token is shown
exactly once, by ``azfs user token`` (or written to a 0600 ``--out`` file);
``create`` does not print the first token the API returns.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from azfs.cli.rest import (
    add_client_flags,
    check_name,
    client_from_args,
    emit,
    emit_record,
    ref_path,
    write_secret,
)
from azfs.client.manager import create_user, issue_token, list_users
from azfs.errors import UserError

COLUMNS = [("name", "name"), ("admin", "admin"), ("uid", "uid"), ("gid", "gid"),
           ("created_at", "created")]
MAX_ID = 2**32 - 2


def _public(user: dict) -> dict:
    """A user record without its token (``POST /v1/users`` answers one)."""
    return {k: v for k, v in user.items() if k != "token"}


# ---- commands ----------------------------------------------------------------------
def _user(args: argparse.Namespace) -> str:
    return ref_path(check_name(args.name, "user name"))


def _id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= MAX_ID:
        raise argparse.ArgumentTypeError(f"must be 0-{MAX_ID}")
    return value


def _create(args: argparse.Namespace) -> int:
    user = create_user(client_from_args(args), args.name, admin=args.admin,
                       uid=args.uid, gid=args.gid)
    emit(args, _public(user), COLUMNS)
    if not args.json:
        print(f"issue a token with: azfs user token {args.name}")
    return 0


def _ls(args: argparse.Namespace) -> int:
    emit(args, list_users(client_from_args(args)), COLUMNS)
    return 0


def _info(args: argparse.Namespace) -> int:
    data = client_from_args(args).call("GET", f"/v1/users/{_user(args)}")
    emit_record(args, data, COLUMNS)
    return 0


def _whoami(args: argparse.Namespace) -> int:
    emit_record(args, client_from_args(args).call("GET", "/v1/users/me"), COLUMNS)
    return 0


def _set(args: argparse.Namespace) -> int:
    body = {k: v for k, v in (("admin", args.admin), ("uid", args.uid), ("gid", args.gid))
            if v is not None}
    if not body:
        raise UserError("nothing to change: give --uid, --gid, --admin or --no-admin")
    data = client_from_args(args).call("PATCH", f"/v1/users/{_user(args)}", body)
    emit(args, data, COLUMNS)
    return 0


def _token(args: argparse.Namespace) -> int:
    if args.out and not Path(args.out).parent.is_dir():
        raise UserError(f"cannot write {args.out}: no such directory")
    client = client_from_args(args)
    token = issue_token(client, args.name, args.label)
    if args.out:
        path = write_secret(args.out, token)
        if args.json:
            print(json.dumps({"user": args.name, "label": args.label, "file": str(path)}))
        else:
            print(path)
    elif args.json:
        print(json.dumps({"user": args.name, "label": args.label, "token": token}))
    else:
        print(token)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    client_from_args(args).call("DELETE", f"/v1/users/{_user(args)}/tokens")
    if args.json:
        print(json.dumps({"user": args.name, "tokens_revoked": True}))
    else:
        print(f"{args.name}: every token revoked")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("user", help="users and API tokens (through the manager)",
                                   description=__doc__.splitlines()[0].replace("``", ""))
    sub = parser.add_subparsers(dest="user_command", metavar="ACTION", required=True)

    p = sub.add_parser("create", help="create a user (admins); no token is printed")
    p.add_argument("name")
    p.add_argument("--admin", action="store_true", help="make the user an admin")
    p.add_argument("--uid", type=_id, help="POSIX uid of the user's kernels (default 1000)")
    p.add_argument("--gid", type=_id, help="POSIX gid of the user's kernels (default 1000)")
    p.set_defaults(func=_create)

    p = sub.add_parser("ls", help="list users (admins)")
    p.set_defaults(func=_ls)

    p = sub.add_parser("info", help="one user (admins, or yourself)")
    p.add_argument("name")
    p.set_defaults(func=_info)

    p = sub.add_parser("whoami", help="the user of your token")
    p.set_defaults(func=_whoami)

    p = sub.add_parser("set", help="change a user's uid, gid or admin flag (admins)")
    p.add_argument("name")
    p.add_argument("--uid", type=_id)
    p.add_argument("--gid", type=_id)
    flag = p.add_mutually_exclusive_group()
    flag.add_argument("--admin", dest="admin", action="store_true", default=None)
    flag.add_argument("--no-admin", dest="admin", action="store_false")
    p.set_defaults(func=_set)

    p = sub.add_parser("token", help="issue a new token (shown once)")
    p.add_argument("name")
    p.add_argument("--out", metavar="FILE",
                   help="write the token to FILE (mode 0600) and print only its path")
    p.add_argument("--label", default="", help="a note stored with the token")
    p.set_defaults(func=_token)

    p = sub.add_parser("revoke", help="revoke every token of a user")
    p.add_argument("name")
    p.set_defaults(func=_revoke)

    for action in sub.choices.values():
        add_client_flags(action)
