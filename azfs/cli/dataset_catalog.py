"""The manager's dataset catalog under ``azfs dataset``: register, grant, list, issue a SAS.

Unlike the storage commands of ``azfs dataset`` (which talk to Blob Storage
with an account key), these talk to ``azfs-managerd``: admins register a
container or prefix by URL and say who may read it; users list what they
may read and ask the manager for a short-lived read-only SAS (the account
key stays with the manager).  A SAS is printed only by ``issue-sas``, or
written to a 0600 ``--out`` file.
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
    ref_path,
    write_secret,
)
from azfs.client.manager import catalog, register_dataset
from azfs.errors import UserError

COLUMNS = [("name", "name"), ("visibility", "visibility"), ("url", "url"),
           ("users", "users"), ("created_at", "created")]
CATALOG_COLUMNS = [("name", "name"), ("visibility", "visibility"), ("url", "url")]


def _dataset(name: str) -> str:
    return ref_path(check_name(name, "dataset name"))


# ---- commands ----------------------------------------------------------------------
def _register(args: argparse.Namespace) -> int:
    data = register_dataset(client_from_args(args), args.name, args.source, args.prefix,
                            "shared" if args.shared else "private")
    emit(args, data, COLUMNS)
    return 0


def _unregister(args: argparse.Namespace) -> int:
    client_from_args(args).call("DELETE", f"/v1/datasets/{_dataset(args.name)}")
    if args.json:
        print(json.dumps({"dataset": args.name, "registered": False}))
    else:
        print(f"{args.name}: no longer in the catalog (its blobs are untouched)")
    return 0


def _access(grant: bool):
    def run(args: argparse.Namespace) -> int:
        user = ref_path(check_name(args.user, "user name"))
        data = client_from_args(args).call(
            "PUT" if grant else "DELETE", f"/v1/datasets/{_dataset(args.name)}/users/{user}")
        emit(args, data, [("name", "name"), ("visibility", "visibility"),
                          ("users", "users")])
        return 0
    return run


def _catalog(args: argparse.Namespace) -> int:
    emit(args, catalog(client_from_args(args)), CATALOG_COLUMNS)
    return 0


def _issue_sas(args: argparse.Namespace) -> int:
    if args.out and not Path(args.out).parent.is_dir():
        raise UserError(f"cannot write {args.out}: no such directory")
    body = {"ttl": args.ttl} if args.ttl is not None else None
    data = client_from_args(args).call(
        "POST", f"/v1/datasets/{_dataset(args.name)}/sas", body)
    if args.out:
        path = write_secret(args.out, data["sas"])
        if args.json:
            # the answer's url carries the SAS too: keep only the part before '?'
            print(json.dumps({**{k: v for k, v in data.items() if k != "sas"},
                              "url": data["url"].split("?", 1)[0], "file": str(path)},
                             indent=2))
        else:
            print(path)
    elif args.json:
        print(json.dumps(data, indent=2))
    else:
        print(data["sas"])
    return 0


def register_catalog(ds: argparse._SubParsersAction) -> None:
    """Adds the manager-side actions to the ``azfs dataset`` sub-parsers ``ds``."""
    added = []
    p = ds.add_parser("register", help="add a container or prefix to the manager's catalog "
                                       "(admins)")
    p.add_argument("name")
    p.add_argument("source", metavar="URL",
                   help="https://ACCOUNT.blob.core.windows.net/CONTAINER[/PREFIX] "
                        "(or http://HOST:PORT/ACCOUNT/CONTAINER for emulators); no SAS")
    p.add_argument("--prefix", help="blob name prefix inside the container")
    vis = p.add_mutually_exclusive_group()
    vis.add_argument("--shared", action="store_true", help="every user may read it")
    vis.add_argument("--private", action="store_true",
                     help="admins and granted users only (the default)")
    p.set_defaults(func=_register)
    added.append(p)

    p = ds.add_parser("unregister", help="remove a dataset from the catalog (admins)")
    p.add_argument("name")
    p.set_defaults(func=_unregister)
    added.append(p)

    for verb, grant, text in (("grant", True, "let a user read a private dataset (admins)"),
                              ("revoke", False, "stop a user reading a private dataset "
                                                "(admins)")):
        p = ds.add_parser(verb, help=text)
        p.add_argument("name")
        p.add_argument("user")
        p.set_defaults(func=_access(grant))
        added.append(p)

    p = ds.add_parser("catalog", help="the datasets the manager lets you read")
    p.set_defaults(func=_catalog)
    added.append(p)

    p = ds.add_parser("issue-sas", help="ask the manager for a short-lived read-only SAS")
    p.add_argument("name")
    p.add_argument("--ttl", type=int, help="lifetime in seconds (default: the manager's)")
    p.add_argument("--out", metavar="FILE",
                   help="write the SAS to FILE (mode 0600) and print only its path")
    p.set_defaults(func=_issue_sas)
    added.append(p)

    for action in added:
        add_client_flags(action)
