"""Fixtures for real OCI containers run with runc.

Import them into a test module::

    from tests.support.containers import busybox_rootfs_fixture, runc_fixture  # noqa: F401

and ask for ``busybox_rootfs`` and ``runc``.  ``busybox_rootfs`` is built
once per session in a temp dir.  ``runc`` is a
:class:`~azfs.containers.runc.Runc` with a state root of its own per test,
so ``runc.list()`` shows only that test's containers; whatever a test
leaves running is force-deleted at the end, and the test fails if it left
any.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from azfs.containers.rootfs import build_busybox_rootfs
from azfs.containers.runc import Runc
from azfs.volumes.mountinfo import read_mountinfo
from tests.support.services import missing_service


def require_runc() -> None:
    """Fails (or skips on request, see :func:`missing_service`) unless runc can run here."""
    if os.geteuid() != 0:
        missing_service("runc containers need root")
    if shutil.which("runc") is None:
        missing_service("runc is not installed (Debian package runc)")


def container_id(prefix: str = "t") -> str:
    """A container id no other test uses (runc names cgroups after it)."""
    return f"azfs-{prefix}-{uuid.uuid4().hex[:12]}"


def mountpoints_under(path: str | Path) -> list[str]:
    """Mount points of this mount namespace at or below ``path``.

    Compared by name: resolving every mount point of the machine would wait on
    any hung mount of another test.
    """
    root = os.path.abspath(path).rstrip("/")
    return [m.mount_point for m in read_mountinfo()
            if m.mount_point == root or m.mount_point.startswith(root + "/")]


@pytest.fixture(scope="session", name="busybox_rootfs")
def busybox_rootfs_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox root filesystem with user ``work`` (uid 1000), built once."""
    require_runc()
    return build_busybox_rootfs(tmp_path_factory.mktemp("rootfs") / "busybox")


@pytest.fixture(name="runc")
def runc_fixture(tmp_path: Path) -> Iterator[Runc]:
    """runc with a private state root; fails the test if containers are left over."""
    require_runc()
    runtime = Runc(tmp_path / "runc-state")
    yield runtime
    left = [c["id"] for c in runtime.list()]
    for cid in left:
        runtime.delete(cid)
    assert not left, f"test left containers behind: {left}"
