"""``azfs volumes import|export|list|show|remove``: the remote volume config.

The store is etcd (``--etcd HOST:PORT`` or ``$AZFS_ETCD``) or a YAML file
(``--config-file`` or ``$AZFS_VOLUMES_FILE``; default /etc/azfs/volumes.yaml).
Import validates the whole file before writing anything and writes in one
atomic step.  Passwords are printed as ``***`` unless ``--show-secrets``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from azfs.errors import UserError
from azfs.files import atomic_write
from azfs.volumes.model import (
    MAX_CONFIG_BYTES,
    Volume,
    VolumeConfigError,
    dump_volume,
    dump_yaml,
    load_yaml_file,
    load_yaml_text,
    options_with_password,
)
from azfs.volumes.store import ENV_ETCD, ENV_VOLUMES_FILE, VolumeStore, open_store

DESCRIPTION = """\
Manage the remote volume config.  The store is etcd (--etcd HOST:PORT[,...] or
$AZFS_ETCD; TLS and login from $AZFS_ETCD_CA, $AZFS_ETCD_CERT, $AZFS_ETCD_KEY,
$AZFS_ETCD_USER, $AZFS_ETCD_PASSWORD_FILE) or a YAML file (--config-file or
$AZFS_VOLUMES_FILE; default /etc/azfs/volumes.yaml).

import validates the whole file before writing anything and writes in one
atomic step.  Passwords are printed as *** unless --show-secrets is given."""


def register(sub: argparse._SubParsersAction) -> None:
    store_flags = argparse.ArgumentParser(add_help=False)
    _store_arguments(store_flags, argparse.SUPPRESS)
    secrets = argparse.ArgumentParser(add_help=False)
    secrets.add_argument("--show-secrets", action="store_true",
                         help="print passwords instead of ***")

    p = sub.add_parser("volumes", help="manage the remote volume config (etcd or YAML file)",
                       description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _store_arguments(p, None)
    vsub = p.add_subparsers(dest="volumes_command", metavar="ACTION", required=True)

    imp = vsub.add_parser("import", parents=[store_flags],
                          help="validate a YAML file and write its volumes to the store")
    imp.add_argument("file", metavar="FILE.yaml", help="volume config ('-' for stdin)")
    imp.add_argument("--replace", action="store_true",
                     help="also remove volumes that are not in the file")
    imp.add_argument("--dry-run", action="store_true",
                     help="validate and show what would change; write nothing")
    imp.set_defaults(func=cmd_import)

    exp = vsub.add_parser("export", parents=[store_flags, secrets],
                          help="print the volume config as YAML")
    exp.add_argument("-o", "--output", type=Path, metavar="FILE",
                     help="write to FILE (mode 0600 with --show-secrets) instead of stdout")
    exp.set_defaults(func=cmd_export)

    lst = vsub.add_parser("list", parents=[store_flags, secrets], help="list volumes")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(func=cmd_list)

    show = vsub.add_parser("show", parents=[store_flags, secrets], help="show one volume")
    show.add_argument("name", metavar="NAME")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=cmd_show)

    rm = vsub.add_parser("remove", parents=[store_flags], help="remove one volume")
    rm.add_argument("name", metavar="NAME")
    rm.set_defaults(func=cmd_remove)


def _store_arguments(parser: argparse.ArgumentParser, default: object) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--etcd", metavar="HOST:PORT", default=default,
                       help=f"etcd endpoint(s), comma-separated (default ${ENV_ETCD})")
    group.add_argument("--config-file", metavar="FILE", default=default,
                       help=f"YAML volume file (default ${ENV_VOLUMES_FILE}, "
                            "else /etc/azfs/volumes.yaml)")


def _store(args: argparse.Namespace) -> VolumeStore:
    return open_store(etcd=getattr(args, "etcd", None),
                      config_file=getattr(args, "config_file", None))


def cmd_import(args: argparse.Namespace) -> int:
    if args.file == "-":
        # one byte over the limit is enough for load_yaml_text to refuse it
        volumes = load_yaml_text(sys.stdin.buffer.read(MAX_CONFIG_BYTES + 1), "<stdin>")
    else:
        volumes = load_yaml_file(args.file)
    with _store(args) as store:
        try:
            current = {v.name: v for v in store.list()}
        except VolumeConfigError as exc:
            if not args.replace:
                raise UserError(f"{exc} (import --replace overwrites the whole config)") from None
            print(f"azfs: warning: replacing an invalid config: {exc}", file=sys.stderr)
            current = {}
        new = {v.name: v for v in volumes}
        added = sorted(n for n in new if n not in current)
        changed = sorted(n for n in new if n in current and current[n] != new[n])
        removed = sorted(n for n in current if n not in new) if args.replace else []
        if not args.dry_run:
            store.import_volumes(volumes, replace=args.replace)
        verb = "would import" if args.dry_run else "imported"
        print(f"{verb} {len(volumes)} volume(s) into {store.description}: "
              f"{len(added)} added, {len(changed)} changed, {len(removed)} removed")
        for label, names in (("added", added), ("changed", changed), ("removed", removed)):
            for name in names:
                print(f"  {label}: {name}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    with _store(args) as store:
        text = dump_yaml(store.list(), show_secrets=args.show_secrets)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    _write_file(args.output, text, 0o600 if args.show_secrets else 0o644)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        volumes = store.list()
    if args.json:
        print(json.dumps([dump_volume(v, args.show_secrets) for v in volumes], indent=2,
                         ensure_ascii=False))
        return 0
    print(_table(volumes, args.show_secrets))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with _store(args) as store:
        volume = store.get(args.name)
    entry = dump_volume(volume, args.show_secrets)
    if args.json:
        print(json.dumps(entry, indent=2, ensure_ascii=False))
    else:
        sys.stdout.write(yaml.safe_dump(entry, sort_keys=False, allow_unicode=True))
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    with _store(args) as store:
        store.remove(args.name)
        print(f"removed volume {args.name!r} from {store.description}")
    return 0


def _table(volumes: list[Volume], show_secrets: bool) -> str:
    rows = [("NAME", "AT", "FSTYPE", "PATH", "OPTIONS")]
    rows += [(v.name, v.mount.at, v.mount.fstype, v.mount.path,
              options_with_password(v.mount, show_secrets)) for v in volumes]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)),
                                r[4]]).rstrip() for r in rows)


def _write_file(path: Path, text: str, mode: int) -> None:
    try:
        atomic_write(path, text, mode)
    except OSError as exc:
        raise UserError(f"{path}: cannot write: {exc.strerror}") from None
