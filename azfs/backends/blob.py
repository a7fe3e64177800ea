"""A blob container (or a prefix of it) as a read-only tree: the dataset backend.

Layering: :class:`BlobBackend` (tree, handles) → :mod:`azfs.blob.prefetch`
(read-ahead under the daemon's memory budget) → :mod:`azfs.cache.block`
(node-wide disk cache) → :mod:`azfs.blob.http` (range GETs, retries) with the
SAS of :mod:`azfs.blob.sas`.

Tree: directories are the ``/``-delimited prefixes of blob names, read one
level at a time with a hierarchical listing and cached for
``listing_ttl`` seconds (:meth:`BlobBackend.refresh` drops the cache) in the
process's bounded :mod:`~azfs.blob.listings` cache, least recently used
listings dropped first.
Directory markers -- zero-length blobs named ``dir/`` and blobs with
``hdi_isfolder=true`` metadata (ADLS Gen2) -- show as directories, never as
files.  Names that cannot be a POSIX file name (empty components, ``.``,
``..``, longer than 255 bytes) are skipped.  A name that is both a blob and a
prefix shows as the directory.

Files: ``open`` pins the handle to the size and ETag of the blob in the
cached listing (no round trip; a HEAD only for a blob the listing did not
describe); every GET carries ``If-Match``, so a blob replaced since it was
listed or while open makes reads fail with :class:`~azfs.errors.StaleObject`
(ESTALE) rather than mixing versions, and its directory's listing is dropped
so that the next open sees the new version.  A blob of at most
``small_blob`` bytes is fetched whole by its first read, into the block
cache, outside the per-mount limit on large block fetches: a training loop
reading many small files keeps many GETs in flight.  Writes of any kind raise
:class:`~azfs.errors.ReadOnly`.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import trio

from azfs.backends.base import (
    Attributes,
    Backend,
    DirEntry,
    DirListing,
    FileHandle,
    Node,
    StatFs,
)
from azfs.blob.http import BlobHttp, BlobProps
from azfs.blob.listings import DEFAULT_LISTINGS, ListingCache
from azfs.blob.prefetch import DEFAULT_BUDGET, BlockReader, PrefetchBudget, ReadStats
from azfs.blob.sas import SasManager, TokenSource, file_token_source, static_token_source
from azfs.blob.url import BlobSource, parse_blob_url
from azfs.cache.block import BlockCache
from azfs.errors import AccessDenied, NotFound, ReadOnly, StaleObject, UserError
from azfs.retry import RetryPolicy
from azfs.secret import Secret

log = logging.getLogger(__name__)

MiB = 1024 * 1024
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT
#: tasks writing queued blocks to the disk cache (large blocks: two writes at once)
CACHE_WRITERS = 2
_XATTRS = ("user.azfs.etag", "user.azfs.content_type", "user.azfs.url")


@dataclass(slots=True)
class BlobOptions:
    """Tunables of one blob mount (defaults chosen by measurement, see PERFORMANCE.md)."""

    listing_ttl: float = 60.0
    block_size: int = 8 * MiB
    max_window: int = 4
    #: block fetches in flight per mount (Azurite stalls for seconds beyond ~40 MiB)
    max_requests: int = 4
    renew_before: float = 300.0
    #: a reader that has not read for this long gives its read-ahead buffers back
    idle_reclaim: float = 10.0
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    socket_timeout: float = 15.0
    #: blobs per List Blobs page (the service's maximum)
    list_page_size: int = 5000
    #: bytes of cache writes allowed in flight before new blocks skip the disk cache
    max_pending_cache_bytes: int = 64 * MiB
    #: blobs up to this size are fetched whole by their first read (one GET, cached)
    small_blob: int = 1 * MiB
    #: whole-blob fetches of small blobs in flight per mount
    max_small_requests: int = 32


class BlobNode(Node):
    """A path relative to the source prefix, without trailing slash ('' = root)."""

    __slots__ = ("path", "is_dir")

    def __init__(self, path: str, is_dir: bool) -> None:
        self.path = path
        self.is_dir = is_dir

    def __repr__(self) -> str:
        return f"BlobNode({self.path!r}, dir={self.is_dir})"


@dataclass(slots=True)
class _Entry:
    is_dir: bool
    props: BlobProps | None = None


@dataclass(slots=True)
class _Dir:
    entries: dict[str, _Entry]
    expires: float


class _Version:
    """The :class:`~azfs.blob.prefetch.BlockSource` of one pinned blob version."""

    def __init__(self, backend: BlobBackend, name: str, props: BlobProps) -> None:
        self.backend = backend
        self.name = name
        self.etag = props.etag
        self.size = props.size
        src = backend.source
        self._key = f"{src.account_url}/{src.container}/{name}@{props.etag}" \
                    f"#{backend.options.block_size}:"

    def _block_len(self, index: int) -> int:
        bs = self.backend.options.block_size
        return min(bs, self.size - index * bs)

    async def fetch_block(self, index: int) -> bytearray | bytes:
        b = self.backend
        length = self._block_len(index)
        key = self._key + str(index)
        if b.cache is not None and b.cache.contains(key):
            data = await trio.to_thread.run_sync(b.cache.get, key, 0, length, length)
            if data is not None:
                b.read_stats.cache_hits += 1
                return data
        small = self.size <= b.options.small_blob
        async with b.small_limiter if small else b.fetch_limiter:
            data = await b.http.read_range(self.name, index * b.options.block_size, length,
                                           self.etag)
        if small:
            b.read_stats.whole_fetches += 1
        b._store(key, data)
        return data

    async def read_range(self, offset: int, length: int) -> bytes:
        b = self.backend
        bs = b.options.block_size
        index = offset // bs
        if b.cache is not None and (offset + length - 1) // bs == index:
            key = self._key + str(index)
            if b.cache.contains(key):
                blen = self._block_len(index)
                data = await trio.to_thread.run_sync(b.cache.get, key, offset - index * bs,
                                                     length, blen)
                if data is not None:
                    b.read_stats.cache_hits += 1
                    return data
        return bytes(await b.http.read_range(self.name, offset, length, self.etag))


class BlobFile(FileHandle):
    """An open blob, pinned to the ETag it had at open."""

    __slots__ = ("node", "version", "reader", "stale")

    def __init__(self, node: BlobNode, version: _Version, reader: BlockReader) -> None:
        self.node = node
        self.version = version
        self.reader = reader
        self.stale = False


class BlobBackend(Backend):
    """A read-only tree over a blob container or prefix."""

    read_only = True

    def __init__(self, source: BlobSource, *, token_source: TokenSource | None = None,
                 cache: BlockCache | None = None, budget: PrefetchBudget | None = None,
                 options: BlobOptions | None = None,
                 listings: ListingCache | None = None) -> None:
        self.source = source
        self.options = options or BlobOptions()
        self.cache = cache
        self.budget = budget or DEFAULT_BUDGET
        if token_source is None and source.sas is not None:
            token_source = static_token_source(source.sas)
        if token_source is None:
            raise UserError(f"{source.display}: a SAS is needed (in the URL or a SAS file)")
        self.sas = SasManager(source.sas, token_source, what=source.display,
                              renew_before=self.options.renew_before)
        self.http = BlobHttp(source, self.sas, policy=self.options.policy,
                             socket_timeout=self.options.socket_timeout,
                             list_page_size=self.options.list_page_size)
        self.sas.set_probe(self.http.probe)
        self.read_stats = ReadStats()
        self.fetch_limiter = trio.CapacityLimiter(self.options.max_requests)
        self.small_limiter = trio.CapacityLimiter(self.options.max_small_requests)
        self._root = BlobNode("", True)
        #: cached listings, in a cache shared by every blob backend of the process
        self.listings: ListingCache = listings if listings is not None else DEFAULT_LISTINGS
        #: one lock per directory being listed right now (dropped when nobody waits)
        self._dir_locks: dict[str, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self._pending_cache_bytes = 0
        self._cache_queue: deque[tuple[str, bytearray | bytes]] = deque()
        self._cache_wakeup = trio.Event()
        self.refreshes = 0
        self._open_files: set[BlobFile] = set()
        self._mtime_ns = time.time_ns()

    @classmethod
    def from_url(cls, url: str, *, sas_file: Path | None = None,
                 token_source: TokenSource | None = None, cache: BlockCache | None = None,
                 cache_dir: Path | None = None, cache_bytes: int = 10 * 1024 * MiB,
                 budget: PrefetchBudget | None = None,
                 options: BlobOptions | None = None,
                 listings: ListingCache | None = None) -> BlobBackend:
        """A backend for ``https://ACCOUNT.blob.core.windows.net/CONTAINER[/PREFIX][?SAS]``.

        The SAS comes from ``token_source`` (agent), else ``sas_file`` (re-read
        at each renewal), else the URL's query.  ``cache`` (or ``cache_dir`` +
        ``cache_bytes``, shared per directory within the process) enables the
        disk block cache.
        """
        source = parse_blob_url(url)
        if token_source is None and sas_file is not None:
            path = Path(sas_file)
            if not path.is_file():
                raise UserError(f"SAS file {path} does not exist")
            token_source = file_token_source(path)
            if source.sas is None:
                try:
                    source = source.with_sas(Secret(path.read_text().strip()))
                except OSError as exc:
                    raise UserError(f"cannot read SAS file {path}: {exc.strerror}") from exc
        if cache is None and cache_dir is not None:
            cache = BlockCache.shared(Path(cache_dir), cache_bytes)
        return cls(source, token_source=token_source, cache=cache, budget=budget,
                   options=options, listings=listings)

    @property
    def cache_timeout(self) -> float:
        """How long the kernel may cache entries and attributes: as long as listings."""
        return self.options.listing_ttl

    # ---- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        await self.sas.start()
        try:
            await self.http.probe(self.sas.current)
        except AccessDenied:
            why = "has expired" if self.sas.expired() else \
                "was refused (forged, revoked, or lacking READ|LIST)"
            raise AccessDenied(f"{self.source.display}: the SAS {why}") from None
        started = trio.Event()
        trio.lowlevel.spawn_system_task(self._serve, started,
                                        name=f"blob:{self.source.display}")
        await started.wait()

    async def _serve(self, started: trio.Event) -> None:
        """Owns the backend's background tasks (read-ahead, SAS renewal) until close."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._guard, self.sas.run)
                nursery.start_soon(self._guard, self._reclaim_idle)
                if self.cache is not None:
                    for _ in range(CACHE_WRITERS):
                        nursery.start_soon(self._guard, self._cache_writer)
                started.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        except BaseException as exc:  # noqa: BLE001 - a system task must never raise
            if not _only_cancelled(exc):  # cancelled: the event loop is shutting down
                log.exception("blob backend %s: background tasks failed",
                              self.source.display)
        finally:
            self._nursery = None
            started.set()
            self._stopped.set()

    async def _reclaim_idle(self) -> None:
        """Takes read-ahead buffers back from open files that stopped reading."""
        idle = self.options.idle_reclaim
        while True:
            await trio.sleep(max(0.05, idle / 4))
            now = trio.current_time()
            for fh in list(self._open_files):
                if now - fh.reader.last_used >= idle and fh.reader.buffered_bytes:
                    freed = fh.reader.drop_ready_buffers()
                    if freed:
                        log.debug("reclaimed %d read-ahead bytes of idle %s", freed,
                                  fh.node.path)

    async def _guard(self, fn, *args) -> None:
        try:
            await fn(*args)
        except Exception:  # noqa: BLE001 - a background task must not end the mount
            log.exception("blob backend %s: background task failed", self.source.display)

    def _spawn(self, fn, *args) -> None:
        if self._nursery is None:
            raise StaleObject("the blob backend is closed")
        self._nursery.start_soon(fn, *args)

    async def close(self) -> None:
        for fh in list(self._open_files):
            fh.reader.close()
        self._open_files.clear()
        self._stop.set()
        if self._nursery is not None:
            await self._stopped.wait()
        if self._cache_queue and self.cache is not None:
            # blocks fetched but not yet written: a closing mount keeps them too
            batch = list(self._cache_queue)
            self._cache_queue.clear()
            await trio.to_thread.run_sync(_put_all, self.cache, batch)
        self.listings.drop(self)
        await trio.to_thread.run_sync(self.http.close)

    # ---- tree ----------------------------------------------------------------------
    def root(self) -> Node:
        return self._root

    def refresh(self, path: str | None = None) -> None:
        """Forgets cached listings (all, or of ``path`` and below): the explicit refresh."""
        self.refreshes += 1
        if path is None:
            self.listings.drop(self)
            return
        path = path.strip("/")
        for key in [k for k in self.listings.paths(self)
                    if k == path or k.startswith(path + "/") or not path]:
            self.listings.pop(self, key)

    def _attrs(self, path: str, entry: _Entry) -> Attributes:
        props = entry.props
        mtime = props.mtime_ns if props and props.mtime_ns else self._mtime_ns
        if entry.is_dir:
            return Attributes(key=("blob", path), mode=stat.S_IFDIR | 0o555, nlink=2,
                              size=0, atime_ns=mtime, mtime_ns=mtime, ctime_ns=mtime)
        size = props.size if props else 0
        return Attributes(key=("blob", path), mode=stat.S_IFREG | 0o444, size=size,
                          blocks=(size + 511) // 512, atime_ns=mtime, mtime_ns=mtime,
                          ctime_ns=mtime)

    async def _dir(self, path: str) -> _Dir:
        cached = self.listings.get(self, path)
        now = trio.current_time()
        if cached is not None and cached.expires > now:
            return cached
        lock = self._dir_locks.setdefault(path, trio.Lock())
        try:
            async with lock:
                cached = self.listings.get(self, path)
                if cached is not None and cached.expires > trio.current_time():
                    return cached
                listing = await self.http.list_level(self._blob_prefix(path))
                entries = _entries(self._blob_prefix(path), listing.prefixes, listing.blobs)
                result = _Dir(entries, trio.current_time() + self.options.listing_ttl)
                self.listings.put(self, path, result, len(entries))
                return result
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting \
                    and self._dir_locks.get(path) is lock:
                del self._dir_locks[path]

    def _blob_prefix(self, path: str) -> str:
        return self.source.prefix + (f"{path}/" if path else "")

    def _blob_name(self, path: str) -> str:
        return self.source.prefix + path

    async def _entry(self, path: str) -> _Entry:
        if not path:
            return _Entry(True)
        parent, _, name = path.rpartition("/")
        entry = (await self._dir(parent)).entries.get(name)
        if entry is None:
            raise NotFound(f"{name!r} not found in the dataset")
        return entry

    async def lookup(self, parent: Node, name: str) -> tuple[Node, Attributes]:
        assert isinstance(parent, BlobNode)
        if not parent.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        path = f"{parent.path}/{name}" if parent.path else name
        entry = (await self._dir(parent.path)).entries.get(name)
        if entry is None:
            raise NotFound(f"{name!r} not found in the dataset")
        return BlobNode(path, entry.is_dir), self._attrs(path, entry)

    async def getattr(self, node: Node) -> Attributes:
        assert isinstance(node, BlobNode)
        return self._attrs(node.path, await self._entry(node.path))

    async def opendir(self, node: Node) -> DirListing:
        assert isinstance(node, BlobNode)
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        listing = await self._dir(node.path)
        return DirListing([
            DirEntry(name, stat.S_IFDIR if e.is_dir else stat.S_IFREG)
            for name, e in sorted(listing.entries.items())])

    async def statfs(self) -> StatFs:
        return StatFs(block_size=4096, blocks=0, blocks_free=0, blocks_avail=0,
                      files=0, files_free=0, name_max=255)

    # ---- files --------------------------------------------------------------------
    async def open(self, node: Node, flags: int) -> FileHandle:
        assert isinstance(node, BlobNode)
        if flags & _WRITE_FLAGS:
            raise ReadOnly("blob datasets are read-only")
        if node.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        entry = await self._entry(node.path)
        props = entry.props if not entry.is_dir else None
        if props is None or not props.etag:
            props = await self.http.properties(self._blob_name(node.path))
            self._update_entry(node.path, props)
        version = _Version(self, props.name, props)
        reader = BlockReader(props.size, self.options.block_size, version, self._spawn,
                             self.budget, self.read_stats, self.options.max_window,
                             whole_below=self.options.small_blob)
        fh = BlobFile(node, version, reader)
        self._open_files.add(fh)
        return fh

    def _update_entry(self, path: str, props: BlobProps) -> None:
        """Keeps the cached listing in step with what an open just saw."""
        parent, _, name = path.rpartition("/")
        cached = self.listings.get(self, parent)
        if cached is not None:
            entry = cached.entries.get(name)
            if entry is not None and not entry.is_dir:
                entry.props = props

    async def read(self, fh: FileHandle, offset: int, size: int) -> bytes:
        assert isinstance(fh, BlobFile)
        if fh.stale:
            raise StaleObject(f"{fh.node.path!r} was replaced while open")
        if offset < 0 or size < 0:
            raise OSError(errno.EINVAL, "negative offset or size")
        try:
            return await fh.reader.read(offset, size)
        except StaleObject:
            if not fh.stale:
                fh.stale = True
                log.warning("%s%s was replaced since it was listed; reads of this handle "
                            "fail with ESTALE (reopen to read the new version)",
                            self.source.display, fh.node.path)
                fh.reader.close()
                # the next open must see the new version: list the directory again
                self.listings.pop(self, fh.node.path.rpartition("/")[0])
            raise

    async def release(self, fh: FileHandle) -> None:
        assert isinstance(fh, BlobFile)
        fh.reader.close()
        self._open_files.discard(fh)

    def _store(self, key: str, data: bytearray | bytes) -> None:
        """Queues a fetched block for the disk cache (best effort, written in batches)."""
        if self.cache is None or self._nursery is None:
            return
        if self._pending_cache_bytes + len(data) > self.options.max_pending_cache_bytes:
            self.read_stats.cache_skipped += 1
            return
        self._pending_cache_bytes += len(data)
        self._cache_queue.append((key, data))
        self._cache_wakeup.set()

    async def _cache_writer(self) -> None:
        """Writes queued blocks, many per worker thread call.

        One thread hop per small blob cost more than the write itself (a
        training loop's files are 50-500 KB): batches keep the event loop free.
        """
        assert self.cache is not None
        cache = self.cache
        while True:
            while not self._cache_queue:
                await self._cache_wakeup.wait()
                self._cache_wakeup = trio.Event()
            batch: list[tuple[str, bytearray | bytes]] = []
            size = 0
            while self._cache_queue and len(batch) < 64 and size < 16 * MiB:
                item = self._cache_queue.popleft()
                batch.append(item)
                size += len(item[1])
            try:
                await trio.to_thread.run_sync(_put_all, cache, batch)
            finally:
                self._pending_cache_bytes -= size

    async def getxattr(self, node: Node, name: str) -> bytes:
        assert isinstance(node, BlobNode)
        entry = await self._entry(node.path)
        if name == "user.azfs.url":
            return (self.source.display + node.path).encode()
        if entry.props is not None:
            if name == "user.azfs.etag":
                return entry.props.etag.encode()
            if name == "user.azfs.content_type":
                return entry.props.content_type.encode()
        raise OSError(errno.ENODATA, "no such attribute")

    async def listxattr(self, node: Node) -> list[str]:
        assert isinstance(node, BlobNode)
        entry = await self._entry(node.path)
        return list(_XATTRS) if entry.props is not None else ["user.azfs.url"]

    # ---- observability -----------------------------------------------------------
    def stats(self) -> dict[str, object]:
        """Counters for tests, logs and metrics."""
        out: dict[str, object] = {
            f"read.{k}": getattr(self.read_stats, k) for k in self.read_stats.__slots__}
        out.update({
            "http.requests": self.http.requests,
            "http.data_gets": self.http.data_gets,
            "http.heads": self.http.heads,
            "http.lists": self.http.lists,
            "refreshes": self.refreshes,
            "listing_ttl": self.options.listing_ttl,
            "http.bytes": self.http.bytes_received,
            "budget.used": self.budget.used,
            "budget.peak": self.budget.peak,
            "budget.max": self.budget.max_bytes,
            "sas.renewals": self.sas.renewals,
            "sas.failed_renewals": self.sas.failed_renewals,
            "open_files": len(self._open_files),
            "listings.dirs": self.listings.owned(self)[0],
            "listings.entries": self.listings.owned(self)[1],
        })
        if self.cache is not None:
            c = self.cache.stats()
            out.update({"cache.hits": c.hits, "cache.misses": c.misses,
                        "cache.bytes": c.bytes, "cache.entries": c.entries})
        return out


def _put_all(cache: BlockCache, batch: list[tuple[str, bytearray | bytes]]) -> None:
    """Runs in a worker thread: one failed write does not lose the others."""
    for key, data in batch:
        try:
            cache.put(key, data)
        except OSError as exc:
            log.warning("block cache write failed: %s", exc)


def _only_cancelled(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_cancelled(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


def _valid_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "\0" not in name \
        and len(name.encode()) <= 255


def _entries(prefix: str, prefixes: list[str], blobs: list[BlobProps]) -> dict[str, _Entry]:
    """One directory level from a hierarchical listing under ``prefix``."""
    entries: dict[str, _Entry] = {}
    for blob in blobs:
        rel = blob.name[len(prefix):]
        if not rel:
            continue  # the marker of this directory itself ("dir/")
        if rel.endswith("/") or blob.is_folder:
            name = rel.rstrip("/")
            if _valid_name(name) and "/" not in name:
                entries[name] = _Entry(True, blob)
            continue
        if _valid_name(rel):
            entries.setdefault(rel, _Entry(False, blob))
    for sub in prefixes:
        name = sub[len(prefix):].rstrip("/")
        if not _valid_name(name) or "/" in name:
            continue  # "a//b": an empty component cannot be a directory name
        existing = entries.get(name)
        if existing is not None and not existing.is_dir:
            log.debug("%s%s is both a blob and a prefix; showing the directory", prefix, name)
        if existing is None or not existing.is_dir:
            entries[name] = _Entry(True, None)
    return entries
