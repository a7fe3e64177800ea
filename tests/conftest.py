"""Shared fixtures.  Keep this file small: helpers live in ``tests/support``."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.support.fuse import Mount, cleanup


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """Factory: ``mounted("--ro", "--quota-bytes", "1M")`` → a live :class:`Mount`.

    Source and mountpoint are fresh temp dirs unless ``source=``/``mnt=`` are
    given; ``prefix`` wraps the command (e.g. ``["prlimit", ...]``).  Volume
    calls go through worker threads (``--io-mode threads``, what a network
    share gets in production) unless the options choose another mode.  Every
    mount made is lazily unmounted and its daemon ended at teardown, even when
    the test failed or killed the daemon itself.
    """
    mounts: list[Mount] = []
    counter = itertools.count()
    env = dict(os.environ, AZFS_RUN_DIR=str(tmp_path / "run"))

    def factory(*options: str, source: Path | None = None, mnt: Path | None = None,
                prefix: Sequence[str] = ()) -> Mount:
        n = next(counter)
        src = source if source is not None else tmp_path / f"src{n}"
        mp = mnt if mnt is not None else tmp_path / f"mnt{n}"
        src.mkdir(parents=True, exist_ok=True)
        mp.mkdir(parents=True, exist_ok=True)
        if "--io-mode" not in options:
            options = ("--io-mode", "threads", *options)
        m = Mount(src, mp, options, tmp_path / f"azfs{n}.log", env, prefix)
        mounts.append(m)
        m.mount()
        return m

    yield factory
    for m in reversed(mounts):
        cleanup(m)
