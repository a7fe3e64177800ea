"""Kernel homes on the host (``agentd.homes``): binds placed, replaced, removed, torn down.

Real mounts in the test's mount namespace (root needed); the sources are
plain directories.  What a running container sees of the same operations is
in ``test_t2_runc.py`` and ``test_t6_*``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentd.homes import Bind, HomeError, KernelHomes
from azfs.volumes.hostmount import lazy_unmount
from tests.support.containers import mountpoints_under


@pytest.fixture
def homes(tmp_path: Path) -> Iterator[KernelHomes]:
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    homes = KernelHomes(tmp_path / "state")
    try:
        yield homes
    finally:
        for point in sorted(mountpoints_under(tmp_path), key=len, reverse=True):
            lazy_unmount(point)
    assert mountpoints_under(tmp_path) == []


def _source(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    (path / "which").write_text(name)
    return path


def _at(tmp_path: Path, target: Path) -> list[str]:
    return [m for m in mountpoints_under(tmp_path) if m == str(target)]


def test_place_replace_remove_and_teardown(homes: KernelHomes, tmp_path: Path) -> None:
    one, two = _source(tmp_path, "one"), _source(tmp_path, "two")
    home = homes.prepare("k1", 1000, 1000)
    assert (home.stat().st_uid, oct(homes.root.stat().st_mode & 0o777)) == (1000, "0o700")
    homes.place("k1", Bind(rel="a/b", source=str(one), read_only=False))
    assert (home / "a" / "b" / "which").read_text() == "one"
    assert oct((home / "a").stat().st_mode & 0o777) == "0o555"  # root-owned, read-only
    # a replacement: the new bind, and only it, at the same path
    homes.place("k1", Bind(rel="a/b", source=str(two), read_only=True))
    assert (home / "a" / "b" / "which").read_text() == "two"
    assert len(_at(tmp_path, home / "a" / "b")) == 1
    with pytest.raises(OSError) as info:
        (home / "a" / "b" / "new").write_text("no")
    assert info.value.errno == errno.EROFS
    states = homes.states("k1", [Bind("a/b", str(two), True), Bind("gone", str(one), False)],
                          {})
    assert states == {"a/b": "live", "gone": "missing"}
    homes.remove("k1", "a/b")
    assert not (home / "a" / "b").exists() and _at(tmp_path, home / "a" / "b") == []
    homes.place("k1", Bind(rel="c", source=str(one), read_only=False))
    (home / "scratch").write_text("kernel's own file")
    homes.destroy("k1")
    assert not home.exists()
    assert (one / "which").read_text() == "one"  # the sources are never touched
    homes.prepare("k2", 1000, 1000)
    homes.place("k2", Bind(rel="x", source=str(one), read_only=False))
    homes.teardown()
    assert mountpoints_under(tmp_path) == []


def test_a_symlink_planted_in_the_home_is_never_followed(homes: KernelHomes,
                                                         tmp_path: Path) -> None:
    one = _source(tmp_path, "one")
    victim = tmp_path / "victim"
    victim.mkdir()
    home = homes.prepare("k1", 1000, 1000)
    os.symlink(victim, home / "data")  # what the kernel's user could do in /home/work
    os.symlink(victim, home / "deep")
    for rel in ("data", "deep/x"):
        with pytest.raises(HomeError) as info:
            homes.place("k1", Bind(rel=rel, source=str(one), read_only=False))
        assert info.value.errno in (errno.ELOOP, errno.ENOTDIR), info.value
    assert [m for m in mountpoints_under(tmp_path) if m.startswith(str(victim))] == []
    assert os.listdir(victim) == []
    with pytest.raises(HomeError):
        homes.place("k1", Bind(rel="../escape", source=str(one), read_only=False))
    homes.destroy("k1")
    assert victim.is_dir() and not home.exists()
