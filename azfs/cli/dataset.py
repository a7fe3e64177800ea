"""``azfs dataset``: create, upload, list, share (SAS) and download blob datasets.

Connection details come from flags or, as in the Azure SDK and CLI, from
``AZURE_STORAGE_CONNECTION_STRING`` or ``AZURE_STORAGE_ACCOUNT`` +
``AZURE_STORAGE_KEY`` (plus ``AZURE_STORAGE_BLOB_ENDPOINT`` or ``--endpoint``
for an emulator such as Azurite).  Keys are never printed, and error
messages are passed through :func:`azfs.secret.redact`.

``upload`` is parallel and resumable: a blob whose size and recorded source
mtime (metadata ``azfs_mtime``) match the local file is skipped, and a blob
appears only once completely uploaded, so an interrupted upload redone sends
only what is missing or changed.  ``get`` uses the same parallel range GETs
as the filesystem and renames the file into place only when complete.
Remote calls go through :mod:`azfs.retry` (the SDK's own retries are off).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from azfs.blob.account import (
    Account,
    MiB,
    account_from_connection_string,
    create_container,
    sdk_errors,
    service_client,
    upload_file,
    uploaded_versions,
)
from azfs.cli.dataset_catalog import register_catalog
from azfs.errors import AzfsError, UserError
from azfs.secret import Secret, redact


# ---- argument parsing ------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dataset", help="create, upload, list, share and download blob datasets",
                       description=__doc__.split("\n\n")[1])
    ds = p.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)

    def connected(name: str, **kw: Any) -> argparse.ArgumentParser:
        q = ds.add_parser(name, **kw)
        g = q.add_argument_group("connection (default: AZURE_STORAGE_* environment)")
        g.add_argument("--connection-string", help="storage connection string")
        g.add_argument("--account-name", help="storage account name")
        g.add_argument("--account-key", help="storage account key (prefer the environment)")
        g.add_argument("--endpoint", help="blob endpoint URL (e.g. Azurite's "
                                          "http://127.0.0.1:10000/devstoreaccount1)")
        return q

    c = connected("create", help="create a container")
    c.add_argument("container")
    c.add_argument("--exist-ok", action="store_true", help="succeed if it exists already")
    c.set_defaults(func=cmd_create)

    u = connected("upload", help="upload a file or a directory tree (parallel, resumable)")
    u.add_argument("local_path", metavar="LOCAL_PATH")
    u.add_argument("dest", metavar="CONTAINER[/PREFIX]",
                   help="container and optional blob prefix to upload under")
    u.add_argument("--content-type", help="content type of every blob (default: guessed)")
    u.add_argument("--concurrency", type=_positive, default=8, help="files in parallel")
    u.add_argument("--force", action="store_true", help="upload even unchanged files")
    u.set_defaults(func=cmd_upload)

    ls = connected("ls", help="list containers, or the blobs under CONTAINER[/PREFIX]")
    ls.add_argument("path", nargs="?", metavar="CONTAINER[/PREFIX]")
    ls.add_argument("--recursive", "-r", action="store_true", help="list the whole tree")
    ls.set_defaults(func=cmd_ls)

    s = connected("sas", help="print a container SAS (read+list unless --write)")
    s.add_argument("container")
    s.add_argument("--hours", type=float, default=24.0, help="validity (default 24)")
    s.add_argument("--write", action="store_true", help="also allow add/create/write/delete")
    s.add_argument("--url", action="store_true", help="print the full container SAS URL")
    s.set_defaults(func=cmd_sas)

    g = ds.add_parser("get", help="download one blob with a SAS",
                      description="Download BLOB (a blob URL with a SAS query, or with "
                                  "--sas/--sas-file) to LOCAL_PATH.")
    g.add_argument("blob", metavar="BLOB_URL")
    g.add_argument("local_path", metavar="LOCAL_PATH")
    g.add_argument("--sas", help="SAS query string (prefer --sas-file)")
    g.add_argument("--sas-file", type=Path, help="file holding the SAS")
    g.add_argument("--concurrency", type=_positive, default=4, help="range GETs in flight")
    g.set_defaults(func=cmd_get)
    r = ds.add_parser("refresh", help="make a mounted dataset list the container again now",
                      description="Forget the cached listings of the dataset mounted at "
                                  "MOUNTPOINT (by 'azfs mount'), so that new, replaced and "
                                  "deleted blobs show at the next lookup instead of after "
                                  "the listing TTL.")
    r.add_argument("mountpoint", metavar="MOUNTPOINT")
    r.add_argument("--path", default=None, help="only this folder and below")
    r.set_defaults(func=cmd_refresh)

    st = ds.add_parser("stats", help="counters of a mounted dataset (GETs, cache hits)")
    st.add_argument("mountpoint", metavar="MOUNTPOINT")
    st.set_defaults(func=cmd_stats)
    register_catalog(ds)  # the manager-side actions: register, grant, catalog, issue-sas


def _control_socket(mountpoint: str) -> Path:
    from azfs.blob.control import socket_path
    from azfs.cli.mount import _pidfile
    from azfs.volumes.mountinfo import find_mount

    mp = Path(os.path.abspath(mountpoint))
    entry = find_mount(mp)
    if entry is None or entry.fstype != "fuse.azfs":
        raise UserError(f"{mp}: not an azfs mount")
    return socket_path(_pidfile(mp))


def cmd_refresh(args: argparse.Namespace) -> int:
    from azfs.blob.control import call

    path = args.path.strip("/") if args.path else None
    if path is not None and any(p in (".", "..") for p in path.split("/")):
        raise UserError("--path must not contain '.' or '..'")
    call(_control_socket(args.mountpoint), {"op": "refresh", "path": path})
    print(f"refreshed {args.mountpoint}" + (f" ({path})" if path else ""))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    import json

    from azfs.blob.control import call

    print(json.dumps(call(_control_socket(args.mountpoint), {"op": "stats"}), indent=2,
                     sort_keys=True))
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _split_dest(text: str) -> tuple[str, str]:
    container, _, prefix = text.strip("/").partition("/")
    if not container:
        raise UserError("name a container: CONTAINER[/PREFIX]")
    prefix = "/".join(p for p in prefix.split("/") if p)
    if any(p in (".", "..") for p in prefix.split("/")):
        raise UserError("the blob prefix must not contain '.' or '..'")
    return container, prefix


# ---- connection ------------------------------------------------------------------
def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def resolve_account(args: argparse.Namespace) -> Account:
    """Connection details from flags, else from the SDK's environment variables."""
    cs = args.connection_string or _env("AZURE_STORAGE_CONNECTION_STRING")
    endpoint = args.endpoint or _env("AZURE_STORAGE_BLOB_ENDPOINT")
    if cs and not (args.account_name or args.account_key):
        return account_from_connection_string(cs, endpoint)
    name = args.account_name or _env("AZURE_STORAGE_ACCOUNT")
    key = args.account_key or _env("AZURE_STORAGE_KEY")
    if not name or not key:
        raise UserError("no storage account: set AZURE_STORAGE_CONNECTION_STRING, or "
                        "AZURE_STORAGE_ACCOUNT and AZURE_STORAGE_KEY (or the matching flags)")
    endpoint = endpoint or f"https://{name}.blob.core.windows.net"
    return Account(name, Secret(key), endpoint.rstrip("/"), None)


# ---- create / ls / sas -------------------------------------------------------------
def cmd_create(args: argparse.Namespace) -> int:
    if not create_container(service_client(resolve_account(args)), args.container):
        if not args.exist_ok:
            raise UserError(f"container {args.container!r} already exists")
        print(f"container {args.container} exists")
        return 0
    print(f"created container {args.container}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from azure.storage.blob import BlobPrefix
    service = service_client(resolve_account(args))
    if not args.path:
        with sdk_errors("list containers"):
            for c in service.list_containers():
                print(f"{c.name}/")
        return 0
    container, prefix = _split_dest(args.path)
    if prefix:
        prefix += "/"
    client = service.get_container_client(container)
    with sdk_errors(f"list {args.path}", container):
        items = client.list_blobs(name_starts_with=prefix or None) if args.recursive \
            else client.walk_blobs(name_starts_with=prefix or None, delimiter="/")
        for item in items:
            if isinstance(item, BlobPrefix):
                print(f"{'':>12}  {'':>19}  {item.name}")
                continue
            when = item.last_modified.strftime("%Y-%m-%d %H:%M:%S") if item.last_modified \
                else ""
            print(f"{item.size:>12}  {when:>19}  {item.name}")
    return 0


def cmd_sas(args: argparse.Namespace) -> int:
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas
    if not 0 < args.hours <= 24 * 365:
        raise UserError("--hours must be between 0 and 8760")
    account = resolve_account(args)
    if account.key is None:
        raise UserError("a SAS needs the account key (the connection string has none)")
    now = dt.datetime.now(dt.UTC)
    perms = ContainerSasPermissions(read=True, list=True, add=args.write, create=args.write,
                                    write=args.write, delete=args.write)
    sas = generate_container_sas(account.name, args.container,
                                 account_key=account.key.reveal(), permission=perms,
                                 start=now - dt.timedelta(minutes=5),
                                 expiry=now + dt.timedelta(hours=args.hours))
    print(f"{account.endpoint}/{args.container}?{sas}" if args.url else sas)
    return 0


# ---- upload ------------------------------------------------------------------------
@dataclass(frozen=True)
class _Item:
    path: Path
    blob: str
    size: int
    mtime_ns: int


def _walk(local: Path, prefix: str) -> list[_Item]:
    if local.is_file():
        st = local.stat()
        name = f"{prefix}/{local.name}" if prefix else local.name
        return [_Item(local, name, st.st_size, st.st_mtime_ns)]
    items = []
    for dirpath, dirnames, filenames in os.walk(local):
        dirnames.sort()
        for fname in sorted(filenames):
            path = Path(dirpath) / fname
            if path.is_symlink() or not path.is_file():
                continue
            rel = path.relative_to(local).as_posix()
            st = path.stat()
            items.append(_Item(path, f"{prefix}/{rel}" if prefix else rel, st.st_size,
                               st.st_mtime_ns))
    return items


def _progress():
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), TimeRemainingColumn(),
                        transient=False, disable=not sys.stderr.isatty(),
                        console=_stderr_console())
    return progress


def _stderr_console():
    from rich.console import Console
    return Console(stderr=True)


def cmd_upload(args: argparse.Namespace) -> int:
    local = Path(args.local_path)
    if not local.exists():
        raise UserError(f"{local}: does not exist")
    container, prefix = _split_dest(args.dest)
    items = _walk(local, prefix)
    if not items:
        raise UserError(f"{local}: no files to upload")
    client = service_client(resolve_account(args)).get_container_client(container)
    existing = {} if args.force else uploaded_versions(client, prefix, container)
    todo = [i for i in items
            if args.force or existing.get(i.blob) != (i.size, str(i.mtime_ns))]
    skipped = len(items) - len(todo)
    total = sum(i.size for i in todo)
    progress = _progress()
    failures: list[str] = []

    def upload(item: _Item, task) -> None:
        sent = [0]

        def hook(current: int, _total: int | None) -> None:
            progress.advance(task, current - sent[0])
            sent[0] = current

        def restart() -> None:
            progress.advance(task, -sent[0])
            sent[0] = 0
        upload_file(client, item.blob, item.path, item.size, item.mtime_ns, container,
                    content_type=args.content_type, hook=hook, restart=restart)
        progress.advance(task, item.size - sent[0])

    with progress:
        task = progress.add_task(f"uploading {len(todo)} files", total=total)
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            futures = {pool.submit(upload, item, task): item for item in todo}
            for fut in as_completed(futures):
                try:
                    fut.result()
                except (AzfsError, OSError) as exc:
                    failures.append(f"{futures[fut].path}: {redact(str(exc))}")
    print(f"uploaded {len(todo) - len(failures)} files, {skipped} unchanged skipped")
    if failures:
        for line in failures[:10]:
            print(f"azfs: {line}", file=sys.stderr)
        raise UserError(f"{len(failures)} of {len(todo)} uploads failed; "
                        "run the same command again to upload what is missing")
    return 0


# ---- get -----------------------------------------------------------------------------
def cmd_get(args: argparse.Namespace) -> int:
    import trio

    from azfs.blob.url import parse_blob_url
    url = args.blob
    sas_text = None
    if args.sas_file is not None:
        try:
            sas_text = args.sas_file.read_text().strip()
        except OSError as exc:
            raise UserError(f"SAS file {args.sas_file}: {exc.strerror}") from None
    elif args.sas:
        sas_text = args.sas
    source = parse_blob_url(url)
    if sas_text:
        source = source.with_sas(sas_text)
    if source.sas is None:
        raise UserError("a SAS is needed: in the URL's query, --sas or --sas-file")
    name = source.prefix.rstrip("/")
    if not name:
        raise UserError("BLOB_URL must name a blob: .../CONTAINER/NAME?SAS")
    source = type(source)(source.account_url, source.account, source.container, "",
                          source.sas)
    target = Path(args.local_path)
    if target.is_dir():
        target = target / name.rsplit("/", 1)[-1]
    if not target.parent.is_dir():
        raise UserError(f"{target.parent}: no such directory")
    if not getattr(args, "debug", False):
        # the daemon-oriented log lines of the read path would repeat the error
        logging.getLogger("azfs.blob").setLevel(logging.CRITICAL)
    size = trio.run(_download, source, name, target, args.concurrency)
    print(f"downloaded {name} ({size} bytes) to {target}")
    return 0


async def _download(source, name: str, target: Path, concurrency: int) -> int:
    import trio

    from azfs.blob.http import BlobHttp
    from azfs.blob.sas import SasManager

    sas = SasManager(source.sas, None, what=source.display)
    http = BlobHttp(source, sas)
    props = await http.properties(name)
    part = target.with_name(f".{target.name}.part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    chunk = 8 * MiB
    progress = _progress()
    try:
        os.ftruncate(fd, props.size)
        with progress:
            task = progress.add_task(f"downloading {name}", total=props.size)
            limiter = trio.Semaphore(concurrency)

            async def one(offset: int) -> None:
                async with limiter:
                    length = min(chunk, props.size - offset)
                    data = await http.read_range(name, offset, length, props.etag)
                    await trio.to_thread.run_sync(os.pwrite, fd, data, offset)
                    progress.advance(task, length)

            async with trio.open_nursery() as nursery:
                for offset in range(0, props.size, chunk):
                    nursery.start_soon(one, offset)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(part, target)
    except BaseException as exc:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(part)
        if isinstance(exc, BaseExceptionGroup):
            first = exc.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        raise
    finally:
        http.close()
    return props.size
