"""A bounded cache of directory listings: the blob trees' memory stays flat.

A dataset with millions of folders would otherwise keep every listing it
ever read.  One :class:`ListingCache` per process (:data:`DEFAULT_LISTINGS`)
holds the listings of every blob backend of the daemon, keyed by owner (a
backend) and path, and drops the least recently used ones -- of whichever
backend -- when the entries they hold together pass ``max_entries`` (an
entry costs about 0.4 KiB: name, size, ETag, mtime; content types and empty
metadata are shared).  The default holds 500,000 entries (about 200 MiB at
most): a flat folder of 100,000 images and the folders above it must fit
together, or every lookup below it would list it again (the agent's
``listing_entries`` sets it).  The
listing just stored is always kept, even when it alone is larger than the
bound, so that a huge flat directory is still listed once per TTL and not
once per lookup.  Not thread-safe: it is used from the event loop only.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

T = TypeVar("T")


class ListingCache(Generic[T]):
    """``(owner, path) → listing``, least recently used first out, bounded by entries."""

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.entries = 0
        self.evictions = 0
        self._items: OrderedDict[tuple[object, str], tuple[T, int]] = OrderedDict()
        # owner → path → size; owners are held (not their ids): a closed owner's ids
        # could be reused by a new one, which must never see the old listings
        self._owned: dict[object, dict[str, int]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, owner: object, path: str) -> T | None:
        """The listing of ``path`` (now the most recently used), or ``None``."""
        key = (owner, path)
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, owner: object, path: str, listing: T, size: int) -> None:
        """Stores ``listing`` of ``size`` entries, then evicts down to the bound."""
        self.pop(owner, path)
        size = max(1, size)
        self._items[(owner, path)] = (listing, size)
        self._owned.setdefault(owner, {})[path] = size
        self.entries += size
        while self.entries > self.max_entries and len(self._items) > 1:
            (who, old_path), (_, old) = self._items.popitem(last=False)
            self._forget(who, old_path, old)
            self.evictions += 1

    def pop(self, owner: object, path: str) -> None:
        item = self._items.pop((owner, path), None)
        if item is not None:
            self._forget(owner, path, item[1])

    def paths(self, owner: object) -> list[str]:
        return list(self._owned.get(owner, ()))

    def owned(self, owner: object) -> tuple[int, int]:
        """(listings, entries) that ``owner`` has in the cache."""
        sizes = self._owned.get(owner, {})
        return len(sizes), sum(sizes.values())

    def drop(self, owner: object) -> None:
        """Forgets every listing of ``owner`` (a refresh, or a backend closing)."""
        for path in self.paths(owner):
            self.pop(owner, path)

    def _forget(self, who: object, path: str, size: int) -> None:
        self.entries -= size
        owned = self._owned.get(who)
        if owned is not None:
            owned.pop(path, None)
            if not owned:
                del self._owned[who]


DEFAULT_ENTRIES = 500_000
#: the listings of every blob backend of this process
DEFAULT_LISTINGS: ListingCache = ListingCache(DEFAULT_ENTRIES)
