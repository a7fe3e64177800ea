"""The node-wide disk block cache: bound, LRU order, counters, restarts, sharing,
and checksummed entries (a corrupt, truncated or torn entry is a miss, never data)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from azfs.cache.block import BlockCache
from azfs.cache.entry import CHUNK, entry_size
from azfs.errors import UserError

KiB = 1024
#: bytes on disk of one 10 KiB entry (block + checksum trailer)
E10 = entry_size(10 * KiB)


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
    assert (s.hits, s.misses, s.puts, s.entries, s.bytes) == (2, 1, 1, 1, E10)
    cache.close()


def test_bounded_in_bytes_with_lru_eviction(root):
    cache = BlockCache(root, 5 * E10)
    for n in range(5):
        cache.put(f"k{n}", block(n))
    assert cache.get("k0", 0, 1, 10 * KiB) == b"\x00"  # k0 becomes most recent
    cache.put("k5", block(5))
    assert cache.stats().bytes <= 5 * E10
    assert not cache.contains("k1")  # the least recently used went first
    assert cache.contains("k0") and cache.contains("k5")
    on_disk = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()
                  and f.name != ".lock")
    assert on_disk <= 5 * E10
    cache.put("huge", b"x" * (5 * E10))  # larger than the cache: not stored
    assert not cache.contains("huge")
    cache.close()


def test_survives_a_restart_and_drops_partial_files(root):
    cache = BlockCache(root, 100 * KiB)
    cache.put("a", block(1))
    cache.put("b", block(2))
    cache.close()
    # a crash mid-write leaves a temporary file; a torn entry has the wrong size
    sub = next(p for p in (root / "blocks-v2").iterdir() if p.is_dir())
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
    files = [f for f in (root / "blocks-v2").rglob("*") if f.is_file()]
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


def entry_file(root: Path, key: str) -> Path:
    digest = hashlib.sha256(key.encode()).hexdigest()
    return root / "blocks-v2" / digest[:2] / digest


SIZE = 4 * CHUNK + 123  # five chunks, the last one short


def damage(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "flipped bit in the data":
        raw[2 * CHUNK + 7] ^= 0x10
    elif how == "flipped bit in the trailer":
        raw[SIZE + 12] ^= 0x01
    elif how == "truncated":
        del raw[SIZE // 2:]
    elif how == "renamed before its data reached the disk":
        raw[:] = bytes(len(raw))
    elif how == "trailer of another length":
        raw[:] = raw[:SIZE - 1] + raw[SIZE:]
    path.write_bytes(bytes(raw))


DAMAGE = ["flipped bit in the data", "flipped bit in the trailer", "truncated",
          "renamed before its data reached the disk", "trailer of another length"]


@pytest.mark.parametrize("restart", [False, True], ids=["live", "after-restart"])
@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_entry_is_a_miss_and_is_removed(root, how: str, restart: bool):
    data = os.urandom(SIZE)
    cache = BlockCache(root, 10 * SIZE)
    cache.put("blk", data)
    cache.put("other", data[::-1])
    assert cache.get("blk", 0, SIZE, SIZE) == data
    damage(entry_file(root, "blk"), how)
    if restart:
        cache.close()
        cache = BlockCache(root, 10 * SIZE)
    misses = cache.stats().misses
    assert cache.get("blk", 0, SIZE, SIZE) is None
    assert cache.stats().misses == misses + 1
    assert not cache.contains("blk") and not entry_file(root, "blk").exists()
    assert cache.stats().entries == 1 and cache.stats().bytes == entry_size(SIZE)
    # the undamaged entry is still served, whole and in part; the block can be cached again
    assert cache.get("other", 0, SIZE, SIZE) == data[::-1]
    assert cache.get("other", SIZE - 5, 100, SIZE) == data[::-1][-5:]
    cache.put("blk", data)
    assert cache.get("blk", 3 * CHUNK - 1, 2, SIZE) == data[3 * CHUNK - 1:3 * CHUNK + 1]
    cache.close()


def test_a_partial_read_checks_the_chunks_it_returns(root):
    """A read verifies its own chunks: damage elsewhere does not stop it, damage there does."""
    data = os.urandom(SIZE)
    cache = BlockCache(root, 10 * SIZE)
    cache.put("blk", data)
    damage(entry_file(root, "blk"), "flipped bit in the data")  # in chunk 2
    assert cache.get("blk", 10, 100, SIZE) == data[10:110]  # chunk 0: intact
    assert cache.get("blk", 2 * CHUNK, 10, SIZE) is None  # chunk 2: refused, dropped
    assert not cache.contains("blk")
    cache.close()


def test_entries_of_the_unchecked_format_are_dropped_at_start(root):
    old = root / "blocks-v1" / "ab"
    old.mkdir(parents=True)
    (old / ("ab" + "0" * 62)).write_bytes(b"x" * 100)
    cache = BlockCache(root, 100 * KiB)
    assert cache.stats().entries == 0 and not (root / "blocks-v1").exists()
    cache.close()
