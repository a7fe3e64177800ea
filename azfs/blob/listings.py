"""A bounded cache of directory listings: the blob tree's memory stays flat.

A dataset with millions of folders would otherwise keep every listing it
ever read.  :class:`ListingCache` holds listings by path and drops the least
recently used ones when the entries they hold together pass ``max_entries``
(an entry costs about 0.6 KiB: name, size, ETag, mtime, content type).  The
listing just stored is always kept, even when it alone is larger than the
bound, so that a huge flat directory is still listed once per TTL and not
once per lookup.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class ListingCache(Generic[T]):
    """``path → listing``, least recently used first out, bounded by total entries."""

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.entries = 0
        self.evictions = 0
        self._items: OrderedDict[str, tuple[T, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, path: str) -> bool:
        return path in self._items

    def paths(self) -> Iterator[str]:
        return iter(list(self._items))

    def get(self, path: str) -> T | None:
        """The listing of ``path`` (now the most recently used), or ``None``."""
        item = self._items.get(path)
        if item is None:
            return None
        self._items.move_to_end(path)
        return item[0]

    def put(self, path: str, listing: T, size: int) -> None:
        """Stores ``listing`` of ``size`` entries, then evicts down to the bound."""
        self.pop(path)
        size = max(1, size)
        self._items[path] = (listing, size)
        self.entries += size
        while self.entries > self.max_entries and len(self._items) > 1:
            _, (_, old) = self._items.popitem(last=False)
            self.entries -= old
            self.evictions += 1

    def pop(self, path: str) -> None:
        item = self._items.pop(path, None)
        if item is not None:
            self.entries -= item[1]

    def clear(self) -> None:
        self._items.clear()
        self.entries = 0
