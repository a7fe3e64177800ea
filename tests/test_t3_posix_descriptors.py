"""The posix backend's descriptor budget: evicted nodes are reopened by name, safely.

Calls the backend in-process (no FUSE): eviction is forced with the pool's own
``evict``, as the budget would under many cached inodes.
"""

from __future__ import annotations

import os
import stat

import pytest

from azfs.backends.posix import PosixBackend
from azfs.backends.posix_nodes import pool
from azfs.errors import StaleObject


@pytest.fixture
async def backend(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    b = PosixBackend(src)
    await b.start()
    yield b
    await b.close()


async def _walk(b: PosixBackend, *names: str):
    node = b.root()
    for name in names:
        node, _ = await b.lookup(node, name)
    return node


async def test_evicted_nodes_reopen_along_their_parents(backend):
    root = backend.root()
    a, _ = await backend.mkdir(root, "a", 0o755)
    bdir, _ = await backend.mkdir(a, "b", 0o755)
    f, attrs, fh = await backend.create(bdir, "f", 0o644, os.O_RDWR)
    await backend.write(fh, 0, b"data")
    await backend.release(fh)
    assert pool.evict(10**6) >= 3
    assert f.fd == -1 and a.fd == -1
    assert (await backend.getattr(f)).key == attrs.key
    assert f.fd >= 0 and a.fd >= 0


async def test_renamed_directory_is_followed_after_eviction(backend):
    root = backend.root()
    a, _ = await backend.mkdir(root, "a", 0o755)
    f, attrs, fh = await backend.create(a, "f", 0o644, os.O_RDWR)
    await backend.release(fh)
    await backend.rename(root, "a", root, "z", 0)
    pool.evict(10**6)
    assert (await backend.getattr(f)).key == attrs.key
    assert a.name == "z"


async def test_object_replaced_on_the_volume_is_stale_not_another_file(backend):
    root = backend.root()
    f, _, fh = await backend.create(root, "f", 0o644, os.O_RDWR)
    await backend.release(fh)
    pool.evict(10**6)
    other = backend.source / "other"
    other.write_bytes(b"someone else's")
    os.rename(other, backend.source / "f")  # behind azfs's back
    with pytest.raises(StaleObject):
        await backend.getattr(f)


async def test_unlinked_but_known_node_keeps_its_descriptor(backend):
    root = backend.root()
    f, attrs, fh = await backend.create(root, "f", 0o644, os.O_RDWR)
    await backend.unlink(root, "f")
    pool.evict(10**6)
    assert f.fd >= 0  # could not be reopened by name: never evicted
    got = await backend.getattr(f)
    assert got.key == attrs.key and got.nlink == 0
    await backend.release(fh)


async def test_evicted_symlink_is_reopened_without_following(backend, tmp_path):
    outside = tmp_path / "outside"
    outside.write_text("secret")
    root = backend.root()
    link, attrs = await backend.symlink(root, "l", str(outside).encode())
    pool.evict(10**6)
    got = await backend.getattr(link)
    assert stat.S_ISLNK(got.mode) and got.key == attrs.key
    assert await backend.readlink(link) == str(outside).encode()
