"""The node's FUSE process: one namespace mount, changed at run time over a private socket.

``python -m agentd.fusehost --mountpoint M --socket S`` mounts an empty
namespace (:class:`~azfs.fs.operations.AzfsOperations` without a root view),
keeps its views and backends in a :class:`~agentd.views.FuseHost` and serves
the control API (:mod:`agentd.hostrpc`) on the unix socket ``S`` (mode 0600).
The process is started by agentd in a session of its own, so that agentd can
die or be upgraded while containers keep using this mount; SIGTERM unmounts
and exits.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from pathlib import Path

import trio

from agentd.hostrpc import ControlServer
from agentd.views import FuseHost
from azfs.blob.listings import DEFAULT_ENTRIES, DEFAULT_LISTINGS
from azfs.fs.operations import AzfsOperations
from azfs.logs import setup_logging
from azfs.volumes.io import IOLimits

log = logging.getLogger("agentd.fusehost")


# ---- process entry point ----------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agentd.fusehost",
                                description="the azfs node FUSE process (started by agentd)")
    p.add_argument("--mountpoint", type=Path, required=True)
    p.add_argument("--socket", type=Path, required=True)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--cache-bytes", type=int, default=0)
    p.add_argument("--io-threads", type=int, default=IOLimits.threads)
    p.add_argument("--metadata-deadline", type=float, default=IOLimits.metadata_deadline)
    p.add_argument("--data-deadline", type=float, default=IOLimits.data_deadline)
    p.add_argument("--io-mode", choices=("auto", "threads", "inline"), default=IOLimits.mode)
    p.add_argument("--xattrs", action="store_true", help="serve extended attributes")
    p.add_argument("--listing-entries", type=int, default=DEFAULT_ENTRIES,
                   help="blob listing entries cached, all datasets together")
    p.add_argument("--debug", action="store_true")
    return p


async def _run(args: argparse.Namespace) -> None:
    from azfs.fs.daemon import raise_fd_limit, serve

    raise_fd_limit()
    DEFAULT_LISTINGS.max_entries = max(1000, args.listing_entries)
    limits = IOLimits(threads=args.io_threads, metadata_deadline=args.metadata_deadline,
                      data_deadline=args.data_deadline, mode=args.io_mode)
    ops = AzfsOperations(xattrs=args.xattrs)
    host = FuseHost(ops, args.mountpoint, args.cache_dir, args.cache_bytes, limits)

    async def control() -> None:
        await ControlServer(host).serve(args.socket)

    try:
        await serve(ops, args.mountpoint, [], tasks=[control])
    finally:
        with trio.CancelScope(shield=True):
            await host.close_all()
            Path(args.socket).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.debug else logging.INFO)
    try:
        trio.run(_run, args)
    except OSError as exc:
        log.error("fusehost: %s", exc)
        return 1 if exc.errno != errno.EPERM else 77
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
