"""Caches shared by all mounts of the daemon (the on-disk block cache)."""

from azfs.cache.block import BlockCache, CacheStats

__all__ = ["BlockCache", "CacheStats"]
