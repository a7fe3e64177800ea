"""The node-wide disk block cache: bound, LRU order, counters, restarts, sharing."""

from __future__ import annotations

import os
import threading

import pytest

from azfs.cache.block import BlockCache
from azfs.errors import UserError

KiB = 1024


def block(n: int, size: int = 10 * KiB) -> bytes:
    return bytes([n % 256]) * size


@pytest.fixture
def root(tmp_path):
    return tmp_path / "cache"


def test_get_put_and_counters(root):
    cache = BlockCache(root, 100 * KiB)
    assert cache.get("a", 0, 10, 10 * KiB) is None
    cache.put("a", block(1))
    assert cache.get("a", 5, 100, 10 * KiB) == block(1)[5:105]
    assert cache.get("a", 10 * KiB - 3, 100, 10 * KiB) == block(1)[:3]
    s = cache.stats()
    assert (s.hits, s.misses, s.puts, s.entries, s.bytes) == (2, 1, 1, 1, 10 * KiB)
    cache.close()


def test_bounded_in_bytes_with_lru_eviction(root):
    cache = BlockCache(root, 50 * KiB)
    for n in range(5):
        cache.put(f"k{n}", block(n))
    assert cache.get("k0", 0, 1, 10 * KiB) == b"\x00"  # k0 becomes most recent
    cache.put("k5", block(5))
    assert cache.stats().bytes <= 50 * KiB
    assert not cache.contains("k1")  # the least recently used went first
    assert cache.contains("k0") and cache.contains("k5")
    on_disk = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()
                  and f.name != ".lock")
    assert on_disk <= 50 * KiB
    cache.put("huge", b"x" * (51 * KiB))  # larger than the cache: not stored
    assert not cache.contains("huge")
    cache.close()


def test_survives_a_restart_and_drops_partial_files(root):
    cache = BlockCache(root, 100 * KiB)
    cache.put("a", block(1))
    cache.put("b", block(2))
    cache.close()
    # a crash mid-write leaves a temporary file; a torn entry has the wrong size
    sub = next(p for p in (root / "blocks-v1").iterdir() if p.is_dir())
    (sub / "deadbeef.123.tmp").write_bytes(b"partial")
    again = BlockCache(root, 100 * KiB)
    assert again.stats().entries == 2
    assert not list(root.rglob("*.tmp"))
    assert again.get("a", 0, 10 * KiB, 10 * KiB) == block(1)
    # an entry of the wrong length is a miss and is removed
    assert again.get("b", 0, 10, 20 * KiB) is None
    assert not again.contains("b")
    again.close()


def test_restart_with_a_smaller_bound_evicts(root):
    cache = BlockCache(root, 100 * KiB)
    for n in range(8):
        cache.put(f"k{n}", block(n))
    cache.close()
    small = BlockCache(root, 30 * KiB)
    assert small.stats().bytes <= 30 * KiB
    small.close()


def test_one_cache_per_directory_per_process(root):
    first = BlockCache.shared(root, 100 * KiB)
    assert BlockCache.shared(root, 100 * KiB) is first
    with pytest.raises(UserError, match="in use"):
        BlockCache(root, 100 * KiB)  # a second owner of the same directory
    first.close()


def test_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError):
        BlockCache(tmp_path / "c", 0)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError):
        BlockCache(blocker / "sub", 1024)


def test_concurrent_puts_never_exceed_the_bound(root):
    cache = BlockCache(root, 64 * KiB)

    def writer(base: int) -> None:
        for n in range(40):
            cache.put(f"{base}-{n}", os.urandom(8 * KiB))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = cache.stats()
    assert s.bytes <= 64 * KiB
    files = [f for f in (root / "blocks-v1").rglob("*") if f.is_file()]
    assert len(files) == s.entries
    cache.close()


def test_large_entries_of_any_length_round_trip(root):
    """Large blocks are written with O_DIRECT (aligned head, buffered tail)."""
    cache = BlockCache(root, 8 * 1024 * KiB)
    for size in (256 * KiB, 300 * KiB + 123, 1024 * KiB + 1):
        data = os.urandom(size)
        cache.put(f"k{size}", data)
        assert cache.get(f"k{size}", 0, size, size) == data
        assert cache.get(f"k{size}", size - 10, 100, size) == data[-10:]
    cache.close()
    again = BlockCache(root, 8 * 1024 * KiB)
    assert again.stats().entries == 3
    again.close()
