"""Read-ahead for one open blob, under one memory budget for the whole daemon.

A :class:`BlockReader` serves the reads of one open file from fixed-size
*blocks* (the unit of range GETs and of the disk cache).  It watches the
offsets it is asked for:

* **sequential** (two reads in a row each start where the previous one
  ended, give or take :data:`SEQUENTIAL_SLACK`): the blocks ahead are fetched in background tasks,
  several at once; the window doubles each time a read finds its block
  already fetched, up to ``max_window`` blocks;
* **random** (anything else): small reads fetch only the bytes they need
  (:meth:`BlockSource.read_range`), nothing ahead; the window resets.

Every block buffer is charged to a :class:`PrefetchBudget` shared by all
open files of the daemon.  When the budget is spent, reads fall back to
fetching just their own range, so memory stays bounded by the budget plus
the reads in progress, however many files are open (500 files opened at once
hold no buffers until they are read, and release them when closed).  A
reader idle for a while gives its ready buffers back (see
:meth:`BlockReader.drop_ready_buffers`), so idle open files cannot starve
active ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from azfs.errors import BackendUnavailable

log = logging.getLogger(__name__)


def _in_trio() -> bool:
    try:
        trio.current_time()
    except RuntimeError:
        return False
    return True


class PrefetchBudget:
    """Bytes of block buffers the daemon may hold; try-acquire, never waits."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self.peak = 0
        self.refused = 0

    def try_acquire(self, nbytes: int) -> bool:
        if self.used + nbytes > self.max_bytes:
            self.refused += 1
            return False
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        return True

    def release(self, nbytes: int) -> None:
        self.used -= nbytes
        assert self.used >= 0, "prefetch budget released more than acquired"


#: How far a read may start from where the previous one ended and still count
#: as sequential: FUSE delivers concurrent read-ahead requests slightly out of order.
SEQUENTIAL_SLACK = 256 * 1024

#: The budget of all blob mounts of this process unless one is given.
DEFAULT_BUDGET = PrefetchBudget(256 * 1024 * 1024)


@dataclass(slots=True)
class ReadStats:
    """Counters of the read path, summed over all files of a backend."""

    reads: int = 0
    sequential_reads: int = 0
    random_reads: int = 0
    blocks_fetched: int = 0
    blocks_prefetched: int = 0
    prefetch_hits: int = 0
    range_reads: int = 0
    budget_fallbacks: int = 0
    #: blocks served by the disk block cache (no GET)
    cache_hits: int = 0
    #: small blobs fetched whole by their first read
    whole_fetches: int = 0
    #: fetched blocks not written to the disk cache (too many writes pending)
    cache_skipped: int = 0


class BlockSource(Protocol):
    """Where a :class:`BlockReader` gets its bytes from (one blob version)."""

    async def fetch_block(self, index: int) -> bytearray | bytes: ...

    async def read_range(self, offset: int, length: int) -> bytes: ...


class _Block:
    __slots__ = ("index", "done", "data", "error", "charged", "discarded", "scope",
                 "prefetched", "budget")

    def __init__(self, index: int, charged: int, budget: PrefetchBudget,
                 prefetched: bool) -> None:
        self.index = index
        self.done = trio.Event()
        self.data: bytearray | bytes | None = None
        self.error: BaseException | None = None
        self.charged = charged
        self.budget = budget
        self.discarded = False
        self.scope = trio.CancelScope()
        self.prefetched = prefetched

    def _uncharge(self) -> None:
        if self.charged:
            self.budget.release(self.charged)
            self.charged = 0

    def discard(self) -> None:
        """Forgets the buffer; the budget is returned now or when the fetch ends."""
        self.discarded = True
        if self.done.is_set():
            self._uncharge()
            self.data = None

    def finish(self) -> None:
        self.done.set()
        if self.discarded or self.error is not None:
            self._uncharge()
            if self.discarded:
                self.data = None


class BlockReader:
    """Pattern detection and read-ahead for one open file."""

    def __init__(self, size: int, block_size: int, source: BlockSource,
                 spawn: Callable[..., None], budget: PrefetchBudget, stats: ReadStats,
                 max_window: int = 4, whole_below: int = 0) -> None:
        self.size = size
        #: a file this small (one block) is fetched whole by its first read
        self.whole = size <= min(whole_below, block_size)
        self.block_size = block_size
        self.source = source
        self._spawn = spawn
        self.budget = budget
        self.stats = stats
        self.max_window = max(1, max_window)
        self.window = 1
        self._blocks: dict[int, _Block] = {}
        self._next = 0
        self._streak = 0
        self._closed = False
        self.last_used = trio.current_time() if _in_trio() else 0.0

    def _block_len(self, index: int) -> int:
        return min(self.block_size, self.size - index * self.block_size)

    def _sequential(self, offset: int) -> bool:
        """Two reads in a row that continue the previous one (reordering tolerated)."""
        slack = min(self.block_size, SEQUENTIAL_SLACK)
        if offset == 0:
            self._streak = max(self._streak, 1)
        elif self._next - slack <= offset <= self._next + slack:
            self._streak += 1
        else:
            self._streak = 0
            self.window = 1
        return self._streak >= 2

    def _start(self, index: int, prefetch: bool) -> _Block | None:
        length = self._block_len(index)
        if length <= 0 or self._closed:
            return None
        if not self.budget.try_acquire(length):
            return None
        block = _Block(index, length, self.budget, prefetch)
        self._blocks[index] = block
        self.stats.blocks_fetched += 1
        if prefetch:
            self.stats.blocks_prefetched += 1
        self._spawn(self._fetch, block)
        return block

    async def _fetch(self, block: _Block) -> None:
        try:
            with block.scope:
                block.data = await self.source.fetch_block(block.index)
        except Exception as exc:  # handed to the reader that needs this block
            block.error = exc
        finally:
            if block.data is None and block.error is None:
                block.error = BackendUnavailable("read-ahead cancelled")
            block.finish()

    def _schedule(self, after: int) -> None:
        last = (self.size - 1) // self.block_size
        for index in range(after + 1, min(last, after + self.window) + 1):
            if index not in self._blocks and self._start(index, prefetch=True) is None:
                break

    def _trim(self, first: int) -> None:
        """Drops buffers behind the reader and beyond the window."""
        keep_to = first + self.max_window + 1
        for index in [i for i in self._blocks if i < first or i > keep_to]:
            self._blocks.pop(index).discard()

    async def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        self.stats.reads += 1
        self.last_used = trio.current_time()
        bs = self.block_size
        first, last = offset // bs, (end - 1) // bs
        sequential = self._sequential(offset) or self.whole
        self._next = end
        if sequential:
            self.stats.sequential_reads += 1
        else:
            self.stats.random_reads += 1
            if not any(i in self._blocks for i in range(first, last + 1)):
                self._trim(first)
                self.stats.range_reads += 1
                return await self.source.read_range(offset, end - offset)
        self._trim(first)
        wanted: list[tuple[int, _Block | None]] = []
        grew = False
        for index in range(first, last + 1):
            block = self._blocks.get(index)
            if block is not None and block.prefetched and not grew:
                self.stats.prefetch_hits += 1
                self.window = min(self.max_window, self.window * 2)
                grew = True
            if block is None:
                block = self._start(index, prefetch=False)
            wanted.append((index, block))
        if sequential:
            self._schedule(last)
        parts: list[bytes] = []
        for index, block in wanted:
            lo = max(offset, index * bs)
            hi = min(end, (index + 1) * bs)
            if block is None:
                self.stats.budget_fallbacks += 1
                parts.append(await self.source.read_range(lo, hi - lo))
                continue
            if not block.done.is_set():  # a ready block is served without a checkpoint
                await block.done.wait()
            if block.error is not None:
                if self._blocks.get(index) is block:
                    del self._blocks[index]
                raise block.error
            data = block.data
            if data is None:  # discarded by a concurrent read that moved on
                parts.append(await self.source.read_range(lo, hi - lo))
                continue
            base = index * bs
            parts.append(bytes(memoryview(data)[lo - base:hi - base]))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def drop_ready_buffers(self) -> int:
        """Returns fetched-but-unread buffers to the budget (an idle reader's share).

        Fetches in flight are left to finish; the bytes are in the disk cache
        if there is one, and are fetched again otherwise.
        """
        freed = 0
        for index, block in list(self._blocks.items()):
            if block.done.is_set():
                freed += block.charged
                self._blocks.pop(index).discard()
        self.window = 1
        return freed

    def close(self) -> None:
        """Cancels fetches in flight and returns every buffer to the budget."""
        self._closed = True
        for block in self._blocks.values():
            block.scope.cancel()
            block.discard()
        self._blocks.clear()

    @property
    def buffered_bytes(self) -> int:
        return sum(b.charged for b in self._blocks.values())
