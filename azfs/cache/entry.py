"""The on-disk format of one block-cache entry: the block, then a checksummed trailer.

Layout: the block's bytes (so large blocks stay page-aligned for O_DIRECT),
then ``MAGIC``, the block length (u64) and one CRC32 per :data:`CHUNK` of the
block (u32 each), then a CRC32 of the trailer itself (all little-endian).
A read checks only the chunks it returns, so a 4 KiB read of an 8 MiB entry
costs one chunk, not the block.  CRC32 catches what a cache must survive --
torn and truncated writes, a rename that reached the disk before the data,
flipped bits -- not deliberate tampering (the cache directory is root's).
"""

from __future__ import annotations

import struct
import zlib

#: bytes covered by one checksum
CHUNK = 32 * 1024
MAGIC = b"AZFSBLK2"
_HEAD = struct.Struct("<8sQ")
_CRC = struct.Struct("<I")


class CorruptEntry(Exception):
    """An entry that must not be served (dropped and counted as a miss)."""


def _chunks(length: int) -> int:
    return -(-length // CHUNK)


def trailer_size(length: int) -> int:
    return _HEAD.size + _CRC.size * (_chunks(length) + 1)


def entry_size(length: int) -> int:
    """Bytes on disk of the entry of a ``length``-byte block."""
    return length + trailer_size(length)


def trailer(data: bytes | bytearray | memoryview) -> bytes:
    """The trailer to write after ``data``."""
    view = memoryview(data)
    crcs = [zlib.crc32(view[pos:pos + CHUNK]) for pos in range(0, len(view), CHUNK)]
    body = _HEAD.pack(MAGIC, len(view)) + struct.pack(f"<{len(crcs)}I", *crcs)
    return body + _CRC.pack(zlib.crc32(body))


def parse_trailer(raw: bytes, length: int) -> tuple[int, ...]:
    """The chunk checksums of an entry said to hold ``length`` bytes."""
    if len(raw) != trailer_size(length):
        raise CorruptEntry("truncated entry")
    body = raw[:-_CRC.size]
    if zlib.crc32(body) != _CRC.unpack(raw[-_CRC.size:])[0]:
        raise CorruptEntry("damaged trailer")
    magic, stored = _HEAD.unpack_from(body)
    if magic != MAGIC or stored != length:
        raise CorruptEntry("not an entry of this length")
    return struct.unpack_from(f"<{_chunks(length)}I", body, _HEAD.size)


def chunk_span(offset: int, size: int, length: int) -> tuple[int, int]:
    """``[start, end)`` of the whole chunks that hold ``size`` bytes at ``offset``."""
    start = min(max(0, offset), length) // CHUNK * CHUNK
    if size <= 0 or offset >= length:
        return start, start
    end = min(length, -(-(offset + size) // CHUNK) * CHUNK)
    return start, end


def verify(data: bytes, start: int, end: int, crcs: tuple[int, ...]) -> None:
    """Checks the chunks ``data`` (read from ``start`` to ``end``) against ``crcs``."""
    if len(data) != end - start:
        raise CorruptEntry("short entry")
    view = memoryview(data)
    first = start // CHUNK
    for i, pos in enumerate(range(0, len(view), CHUNK)):
        if zlib.crc32(view[pos:pos + CHUNK]) != crcs[first + i]:
            raise CorruptEntry("checksum mismatch")
