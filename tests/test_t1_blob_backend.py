"""Blob backend against a real Azurite: tree, byte-exact reads, read-ahead, cache, EROFS.

The backend's methods are called directly under trio (no FUSE); blocks are
small (256 KiB) so that a few-MiB blob spans many blocks.
"""

from __future__ import annotations

import os
import random
import stat

import pytest
import trio

from azfs.backends.base import AttrChanges
from azfs.backends.blob import BlobBackend, BlobOptions
from azfs.blob.listings import ListingCache
from azfs.blob.prefetch import PrefetchBudget
from azfs.cache.block import BlockCache
from azfs.errors import NotFound, ReadOnly
from tests.support.azurite import azurite  # noqa: F401

KiB = 1024
MiB = 1024 * KiB
BLOCK = 256 * KiB
RNG = random.Random(1234)
BIG = RNG.randbytes(5 * MiB + 12345)
MEDIUM = RNG.randbytes(3 * MiB)
SMALL = b"hello, dataset\n"


@pytest.fixture(scope="module")
def dataset(azurite):  # noqa: F811
    azurite.upload("dataset", {
        "small.txt": SMALL,
        "big.bin": BIG,
        "dir/a.bin": MEDIUM,
        "dir/sub/b.bin": MEDIUM[:100 * KiB],
        "empty/": b"",
        "adls": b"",
        "adls/x.txt": b"x",
        "both": b"blob and prefix",
        "both/c": b"c",
        "weird//name": b"w",
        "names/with space.txt": b"space",
        "names/\u00fcn\u00efcode \u6587\u4ef6.txt": b"unicode",
        "names/hash#and?query&amp.txt": b"punctuation",
        "names/percent%20plus+.txt": b"percent",
        "names/a.txt": b"a",
    }, metadata={"adls": {"hdi_isfolder": "true"}})
    return azurite


def options(**kw) -> BlobOptions:
    return BlobOptions(block_size=BLOCK, max_window=4, **kw)


@pytest.fixture
def cache(tmp_path):
    c = BlockCache(tmp_path / "cache", 64 * MiB)
    yield c
    c.close()


async def started(url: str, **kw) -> BlobBackend:
    kw.setdefault("options", options())
    backend = BlobBackend.from_url(url, **kw)
    await backend.start()
    return backend


async def node_at(backend: BlobBackend, path: str):
    node = backend.root()
    for part in path.split("/"):
        node, _ = await backend.lookup(node, part)
    return node


async def read_all(backend: BlobBackend, path: str, chunk: int = 128 * KiB) -> bytes:
    fh = await backend.open(await node_at(backend, path), os.O_RDONLY)
    out = bytearray()
    try:
        while True:
            data = await backend.read(fh, len(out), chunk)
            if not data:
                return bytes(out)
            out += data
    finally:
        await backend.release(fh)


async def names(backend: BlobBackend, node) -> dict[str, bool]:
    listing = await backend.opendir(node)
    return {e.name: stat.S_ISDIR(e.mode) for e in listing.entries}


async def test_tree_listing_markers_and_attributes(dataset):
    url = dataset.container_url("dataset", sas=dataset.container_sas("dataset"))
    backend = await started(url)
    try:
        root = await names(backend, backend.root())
        assert root == {"small.txt": False, "big.bin": False, "dir": True, "empty": True,
                        "adls": True, "both": True, "weird": True, "names": True}
        node, attrs = await backend.lookup(backend.root(), "big.bin")
        assert attrs.is_reg and attrs.size == len(BIG) and attrs.mode & 0o777 == 0o444
        assert attrs.mtime_ns > 0
        _, dattrs = await backend.lookup(backend.root(), "dir")
        assert dattrs.is_dir and dattrs.mode & 0o777 == 0o555
        assert await names(backend, await node_at(backend, "dir")) == {"a.bin": False,
                                                                       "sub": True}
        assert await names(backend, await node_at(backend, "adls")) == {"x.txt": False}
        assert await names(backend, await node_at(backend, "empty")) == {}
        assert await names(backend, await node_at(backend, "both")) == {"c": False}
        # "weird//name" has an empty path component: no entry can show it
        assert await names(backend, await node_at(backend, "weird")) == {}
        with pytest.raises(NotFound):
            await backend.lookup(backend.root(), "missing")
        assert (await backend.getattr(await node_at(backend, "dir/sub/b.bin"))).size \
            == 100 * KiB
        assert await backend.getxattr(node, "user.azfs.etag")
    finally:
        await backend.close()


async def test_prefix_source_shows_only_the_prefix(dataset):
    url = dataset.container_url("dataset", "dir", sas=dataset.container_sas("dataset"))
    backend = await started(url)
    try:
        assert await names(backend, backend.root()) == {"a.bin": False, "sub": True}
        assert await read_all(backend, "sub/b.bin") == MEDIUM[:100 * KiB]
    finally:
        await backend.close()


async def test_listing_cache_ttl_and_refresh(dataset):
    url = dataset.container_url("dataset", sas=dataset.container_sas("dataset"))
    backend = await started(url, options=options(listing_ttl=3600))
    try:
        assert "late.txt" not in await names(backend, backend.root())
        dataset.upload("dataset", {"late.txt": b"late"})
        # within the TTL the cached listing is served ...
        assert "late.txt" not in await names(backend, backend.root())
        backend.refresh()
        # ... and an explicit refresh shows the new blob
        assert "late.txt" in await names(backend, backend.root())
    finally:
        await backend.close()
        dataset.service_client().get_blob_client("dataset", "late.txt").delete_blob()


def test_listing_cache_drops_least_recently_used_and_keeps_the_newest():
    one, two = object(), object()
    cache: ListingCache[str] = ListingCache(10)
    cache.put(one, "a", "A", 4)
    cache.put(two, "a", "B", 4)  # same path, another owner: another listing
    assert cache.get(one, "a") == "A"  # one's a is now more recent than two's
    cache.put(one, "c", "C", 4)
    assert cache.get(two, "a") is None and cache.get(one, "c") == "C"
    assert cache.entries == 8 and cache.evictions == 1 and cache.owned(two) == (0, 0)
    cache.put(two, "huge", "H", 50)  # larger than the bound alone: kept, all others go
    assert len(cache) == 1 and cache.paths(two) == ["huge"] and cache.entries == 50
    cache.drop(two)
    assert len(cache) == 0 and cache.entries == 0


def test_the_default_listing_cache_holds_a_large_flat_folder_with_its_parents():
    """A COCO-sized image folder and the folders above it stay listed together.

    (At the old bound of 100,000 entries, a lookup in a 100,000-blob folder needed
    the root's listing, which evicted the folder's: every lookup listed it again.)
    """
    from azfs.blob.listings import DEFAULT_ENTRIES

    owner = object()
    cache: ListingCache[str] = ListingCache(DEFAULT_ENTRIES)
    cache.put(owner, "", "root", 2)
    cache.put(owner, "coco", "coco", 3)
    cache.put(owner, "coco/train2017", "train", 118_287)
    for _ in range(3):  # lookups below it walk up through the parents
        assert cache.get(owner, "") == "root" and cache.get(owner, "coco") == "coco"
        assert cache.get(owner, "coco/train2017") == "train"
    cache.put(owner, "coco/val2017", "val", 5_000)
    assert cache.evictions == 0 and len(cache) == 4


async def test_a_walk_of_many_folders_keeps_the_listing_cache_bounded(azurite):  # noqa: F811
    """10 folders x 12 subfolders x 2 files, walked twice by two backends that share a
    40-entry listing cache (as every dataset of a daemon shares one).

    The cache never holds more than its bound, a listing dropped from it is
    read again when needed, every file is found with its size and bytes, no
    per-directory lock outlives its listing, and a closed backend leaves nothing.
    """
    blobs = {f"f{i}/s{j}/{k}.txt": f"{i}/{j}/{k}".encode()
             for i in range(10) for j in range(12) for k in range(2)}
    azurite.upload("walk", blobs)
    bound = 40
    listings: ListingCache = ListingCache(bound)
    url = azurite.container_url("walk", sas=azurite.container_sas("walk"))
    backends = [await started(url, listings=listings, options=options(listing_ttl=3600))
                for _ in range(2)]
    try:
        for _ in range(2):
            for backend in backends:
                found: dict[str, bytes] = {}
                for top in sorted(await names(backend, backend.root())):
                    assert listings.entries <= bound
                    for sub in sorted(await names(backend, await node_at(backend, top))):
                        folder = await node_at(backend, f"{top}/{sub}")
                        for name in sorted(await names(backend, folder)):
                            path = f"{top}/{sub}/{name}"
                            attrs = await backend.getattr(await node_at(backend, path))
                            found[path] = await read_all(backend, path)
                            assert attrs.size == len(found[path])
                            assert listings.entries <= bound
                assert found == blobs
                assert backend._dir_locks == {}
        assert listings.evictions > 0
        assert sum(b.stats()["listings.entries"] for b in backends) == listings.entries
        assert listings.entries <= bound and len(listings) < 10 * 12
    finally:
        for backend in backends:
            await backend.close()
    assert len(listings) == 0 and listings.entries == 0


async def test_byte_exact_reads_at_random_offsets(dataset):
    url = dataset.container_url("dataset", sas=dataset.container_sas("dataset"))
    backend = await started(url)
    try:
        fh = await backend.open(await node_at(backend, "big.bin"), os.O_RDONLY)
        rng = random.Random(7)
        for _ in range(60):
            offset = rng.randrange(0, len(BIG) + 1000)
            size = rng.choice([1, 4 * KiB, 100_000, 128 * KiB, BLOCK + 3, 2 * MiB])
            assert await backend.read(fh, offset, size) == BIG[offset:offset + size]
        assert await backend.read(fh, len(BIG), 10) == b""
        await backend.release(fh)
        assert await read_all(backend, "small.txt") == SMALL
        assert await read_all(backend, "dir/a.bin", chunk=1_000_000) == MEDIUM
        assert backend.budget.used == 0
    finally:
        await backend.close()


async def test_sequential_read_is_prefetched(dataset):
    url = dataset.container_url("dataset", sas=dataset.container_sas("dataset"))
    backend = await started(url, budget=PrefetchBudget(64 * MiB))
    try:
        assert await read_all(backend, "big.bin") == BIG
        s = backend.stats()
        assert s["read.blocks_prefetched"] > 0
        assert s["read.prefetch_hits"] > 0
        assert s["read.range_reads"] <= 1  # only the first read, before the pattern shows
        assert s["budget.used"] == 0
    finally:
        await backend.close()


async def test_random_small_reads_fetch_only_what_they_need(dataset):
    url = dataset.container_url("dataset", sas=dataset.container_sas("dataset"))
    backend = await started(url)
    try:
        fh = await backend.open(await node_at(backend, "big.bin"), os.O_RDONLY)
        rng = random.Random(3)
        before = backend.http.bytes_received
        for _ in range(30):
            offset = rng.randrange(BLOCK * 2, len(BIG) - 4 * KiB)
            assert await backend.read(fh, offset, 4 * KiB) == BIG[offset:offset + 4 * KiB]
        s = backend.stats()
        assert s["read.range_reads"] >= 25
        assert s["read.blocks_prefetched"] == 0
        assert backend.http.bytes_received - before <= 30 * 4 * KiB + 2 * BLOCK
        await backend.release(fh)
    finally:
        await backend.close()


async def test_reread_hits_the_shared_disk_cache(dataset, cache):
    url = dataset.container_url("dataset", sas=dataset.container_sas("dataset"))
    # a read-ahead budget of its own: the process-wide one may still be held by the
    # buffers of earlier tests' idle files, and a read that cannot read ahead
    # fetches only its own range, which is not cached
    budget = PrefetchBudget(64 * MiB)
    first = await started(url, cache=cache, budget=budget)
    try:
        assert await read_all(first, "big.bin") == BIG
    finally:
        await first.close()
    blocks = -(-len(BIG) // BLOCK)
    cached = cache.stats().entries
    # the reads before the reader is known to be sequential, and a read that
    # overtakes its block's fetch, go to the service for their own range and are
    # not cached: nearly every block is
    assert blocks - 4 <= cached <= blocks
    # a second mount of the same daemon shares the cache: no data over HTTP but
    # the blocks that were not cached
    second = await started(url, cache=cache, budget=budget)
    try:
        hits = cache.stats().hits
        assert await read_all(second, "big.bin") == BIG
        assert cache.stats().hits - hits >= cached - 1
        assert second.http.bytes_received < 64 * KiB + (blocks - cached) * BLOCK
        # random reads inside cached blocks are hits too
        fh = await second.open(await node_at(second, "big.bin"), os.O_RDONLY)
        assert await second.read(fh, 3 * BLOCK + 5, 4 * KiB) == BIG[3 * BLOCK + 5:
                                                                     3 * BLOCK + 5 + 4 * KiB]
        await second.release(fh)
        assert second.http.bytes_received < 64 * KiB + (blocks - cached) * BLOCK
    finally:
        await second.close()


async def test_many_open_files_stay_within_the_memory_budget(dataset):
    """500 open files reading at once never hold more than the daemon-wide budget."""
    url = dataset.container_url("dataset", sas=dataset.container_sas("dataset"))
    budget = PrefetchBudget(4 * BLOCK)
    backend = await started(url, budget=budget)
    try:
        node = await node_at(backend, "dir/a.bin")
        handles = [await backend.open(node, os.O_RDONLY) for _ in range(500)]
        positions = [0] * len(handles)
        limiter = trio.Semaphore(50)

        async def step(i: int) -> None:
            async with limiter:
                data = await backend.read(handles[i], positions[i], 64 * KiB)
                assert data == MEDIUM[positions[i]:positions[i] + 64 * KiB]
                positions[i] += len(data)
                assert budget.used <= budget.max_bytes

        for _ in range(3):
            async with trio.open_nursery() as nursery:
                for i in range(len(handles)):
                    nursery.start_soon(step, i)
        assert budget.peak <= budget.max_bytes
        assert backend.stats()["read.budget_fallbacks"] > 0
        for fh in handles:
            await backend.release(fh)
        assert budget.used == 0
    finally:
        await backend.close()


async def test_every_kind_of_write_is_read_only(dataset):
    url = dataset.container_url("dataset", sas=dataset.container_sas("dataset"))
    backend = await started(url)
    try:
        root = backend.root()
        node = await node_at(backend, "small.txt")
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            with pytest.raises(ReadOnly):
                await backend.open(node, flags)
        fh = await backend.open(node, os.O_RDONLY)
        with pytest.raises(ReadOnly):
            await backend.write(fh, 0, b"x")
        await backend.release(fh)
        attempts = [
            backend.create(root, "new", 0o644, os.O_WRONLY),
            backend.mkdir(root, "newdir", 0o755),
            backend.unlink(root, "small.txt"),
            backend.rmdir(root, "dir"),
            backend.rename(root, "small.txt", root, "other", 0),
            backend.setattr(node, AttrChanges(size=0), None),
            backend.symlink(root, "ln", b"small.txt"),
            backend.setxattr(node, "user.x", b"1"),
        ]
        for attempt in attempts:
            with pytest.raises(ReadOnly):
                await attempt
        assert backend.read_only
        assert await read_all(backend, "small.txt") == SMALL
    finally:
        await backend.close()


async def test_names_that_need_quoting_and_paged_listings(dataset):
    """Spaces, unicode, '#', '?', '&', '%' and '+' survive listing and range GETs;
    a listing spread over many pages (page size 2 here) is complete."""
    url = dataset.container_url("dataset", sas=dataset.container_sas("dataset"))
    backend = await started(url, options=options(list_page_size=2))
    try:
        listing = await names(backend, await node_at(backend, "names"))
        expected = {"with space.txt": b"space", "\u00fcn\u00efcode \u6587\u4ef6.txt": b"unicode",
                    "hash#and?query&amp.txt": b"punctuation",
                    "percent%20plus+.txt": b"percent", "a.txt": b"a"}
        assert listing == {name: False for name in expected}
        for name, data in expected.items():
            assert await read_all(backend, f"names/{name}") == data
        root = await names(backend, backend.root())
        assert len(root) == 8 and backend.http.requests > 5
    finally:
        await backend.close()


async def test_idle_open_files_give_their_read_ahead_back(dataset):
    """A file left open after a sequential read does not keep the budget."""
    url = dataset.container_url("dataset", sas=dataset.container_sas("dataset"))
    budget = PrefetchBudget(16 * BLOCK)
    backend = await started(url, budget=budget, options=options(idle_reclaim=0.3))
    try:
        fh = await backend.open(await node_at(backend, "big.bin"), os.O_RDONLY)
        for offset in range(0, 4 * 128 * KiB, 128 * KiB):
            assert await backend.read(fh, offset, 128 * KiB) == BIG[offset:offset + 128 * KiB]
        assert backend.stats()["read.blocks_prefetched"] > 0
        with trio.fail_after(10):
            while budget.used:
                await trio.sleep(0.05)
        # the file is still open and reads on from where it was
        offset = 4 * 128 * KiB
        assert await backend.read(fh, offset, 128 * KiB) == BIG[offset:offset + 128 * KiB]
        await backend.release(fh)
    finally:
        await backend.close()
