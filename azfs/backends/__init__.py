"""Backends behind one interface (:mod:`azfs.backends.base`), chosen by source form.

A path is a directory on a host volume (:mod:`azfs.backends.posix`); an
``http(s)://`` URL is a blob container or prefix (:mod:`azfs.backends.blob`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from azfs.backends.base import Backend
from azfs.usage import Quota
from azfs.volumes.io import IOLimits


def open_backend(source: str, *, quota: Quota | None = None, read_only: bool = False,
                 sas_file: Path | None = None,
                 cache_dir: Path | None = None, cache_bytes: int | None = None,
                 limits: IOLimits | None = None, **extra: Any) -> Backend:
    if source.startswith(("http://", "https://")):
        from azfs.backends.blob import BlobBackend
        from azfs.cache import BlockCache

        cache = None
        if cache_dir is not None or cache_bytes is not None:
            cache = BlockCache.open(cache_dir, cache_bytes)
        return BlobBackend.from_url(source, sas_file=sas_file, cache=cache, **extra)
    from azfs.backends.posix import PosixBackend

    return PosixBackend(source, quota=quota, read_only=read_only, limits=limits)
