"""The FUSE Operations and the inode table, called in-process over a real posix backend.

No mount: the handlers are called as pyfuse3 would call them, so that the
bookkeeping (inode table, open handles, descriptors) can be inspected after
each step.  Faults are injected by a subclass of the real backend that fails
one call, the way a volume would.
"""

from __future__ import annotations

import logging
import os

import pyfuse3
import pytest

from azfs.backends.posix import PosixBackend
from azfs.backends.posix_nodes import pool
from azfs.errors import StaleObject
from azfs.fs.inodes import ROOT_INODE, View
from azfs.fs.operations import AzfsOperations
from azfs.volumes.io import IOLimits

CTX = pyfuse3.RequestContext()  # uid 0, umask 0
THREADS = IOLimits(mode="threads")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
async def backend(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    b = PosixBackend(src, limits=THREADS)
    await b.start()
    yield b
    await b.close()


def single(backend) -> AzfsOperations:
    return AzfsOperations(View(label="v", backend=backend))


async def make_file(ops: AzfsOperations, name: bytes, data: bytes = b"x") -> int:
    info, entry = await ops.create(ROOT_INODE, name, 0o644, os.O_RDWR, CTX)
    await ops.write(info.fh, 0, data)
    await ops.release(info.fh)
    return entry.st_ino


async def test_failed_open_leaks_no_descriptor_and_no_inode(backend):
    class FailingGetattr(PosixBackend):
        fail = False

        async def getattr(self, node):
            if self.fail:
                raise OSError(5, "the volume failed")
            return await super().getattr(node)

    backend.__class__ = FailingGetattr
    ops = single(backend)
    ino = await make_file(ops, b"f")
    before = open_fds()
    backend.fail = True
    with pytest.raises(pyfuse3.FUSEError):
        await ops.open(ino, os.O_RDONLY, CTX)
    assert open_fds() == before and not ops._files
    assert ops.table.get(ino).opens == 0
    ops.table.forget(ino, 1)
    assert ino not in ops.table


async def test_release_that_fails_still_drops_the_handle_and_the_inode(backend):
    class StaleRelease(PosixBackend):
        async def release_attrs(self, fh):
            await super().release(fh)
            raise StaleObject("replaced on the volume")

    backend.__class__ = StaleRelease
    ops = single(backend)
    info, entry = await ops.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, CTX)
    await ops.write(info.fh, 0, b"data")  # a write leaves the page-cache stamp unknown
    with pytest.raises(pyfuse3.FUSEError):
        await ops.release(info.fh)
    assert not ops._files
    await ops.forget([(entry.st_ino, 1)])
    assert entry.st_ino not in ops.table


async def test_forget_of_more_than_was_looked_up_is_reported(backend, caplog):
    ops = single(backend)
    ino = await make_file(ops, b"f")
    await ops.lookup(ROOT_INODE, b"f", CTX)  # 2 lookups now
    with caplog.at_level(logging.ERROR, logger="azfs.fs"):
        await ops.forget([(ino, 3)])
    assert ops.forget_underflows == 1
    assert "forget of 3 lookups, 2 known" in caplog.text
    assert ino not in ops.table  # dropped as the kernel asked


async def test_lookup_of_a_missing_name_is_a_cached_negative_entry(backend):
    ops = single(backend)
    entry = await ops.lookup(ROOT_INODE, b"missing", CTX)
    assert entry.st_ino == 0 and entry.entry_timeout == ops.cache_timeout
    uncached = AzfsOperations(View(label="v", backend=backend), cache_timeout=0)
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await uncached.lookup(ROOT_INODE, b"missing", CTX)
    assert exc.value.errno == 2


async def test_detach_with_open_handles_then_release_forgets_everything(backend):
    ops = AzfsOperations()
    fds = open_fds()
    root_ino = ops.attach(["kernels", "k1", "data"], View(label="v", backend=backend))
    info, entry = await ops.create(root_ino, b"f", 0o644, os.O_RDWR, CTX)
    assert await ops.write(info.fh, 0, b"hello") == 5
    assert ops.detach(["kernels", "k1", "data"]) is not None
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.read(info.fh, 0, 5)
    assert exc.value.errno == 116  # ESTALE
    await ops.release(info.fh)
    await ops.forget([(entry.st_ino, 1)])
    assert len(ops.table) == 1  # only the namespace root
    assert open_fds() == fds


async def test_cross_view_invalidations_are_coalesced_and_never_dropped(backend):
    ops = AzfsOperations()
    a = ops.attach(["kernels", "k1", "d"], View(label="v", backend=backend))
    b = ops.attach(["kernels", "k2", "d"], View(label="v", backend=backend, read_only=True))
    info, entry = await ops.create(a, b"f", 0o644, os.O_RDWR, CTX)
    other = await ops.lookup(b, b"f", CTX)
    assert other.st_ino != entry.st_ino
    for i in range(20_000):  # twice the old channel's capacity
        await ops.write(info.fh, i, b"x")
    assert list(ops._stale_inodes) == [other.st_ino]
    # a name made in one view drops the other view's (maybe negative) entry of it
    await ops.mkdir(a, b"new", 0o755, CTX)
    assert (b, "new") in ops._stale_entries
    await ops.release(info.fh)


async def test_readdir_batch_leftovers_and_forgets_return_to_baseline(backend, tmp_path):
    for i in range(300):
        (tmp_path / "src" / f"f{i:03}").write_bytes(b"x")
    ops = single(backend)
    baseline_nodes, baseline_table = len(pool), len(ops.table)
    # what readdirplus does for one reply buffer: a batch looked up at once
    names = [f"f{i:03}" for i in range(300)]
    found = await backend.lookup_batch(backend.root(), names)
    assert all(item is not None for item in found)
    inos = []
    for node, attrs in found:
        inode = ops.table.add_node(ops.root_view, node, attrs)
        inode.lookups += 1
        inos.append(inode.ino)
    assert len(ops.table) == baseline_table + 300
    assert len(pool) == baseline_nodes  # listed, not opened: no descriptors held
    await ops.forget([(ino, 1) for ino in inos])
    assert len(ops.table) == baseline_table and len(pool) == baseline_nodes


async def test_a_view_may_have_its_own_cache_timeout(backend):
    """A dataset's view (listing TTL) is cached by the kernel as long as its listings."""
    ops = AzfsOperations()
    slow = ops.attach(["kernels", "k1", "ds"], View(label="ds", backend=backend,
                                                   cache_timeout=60.0))
    fast = ops.attach(["kernels", "k1", "vf"], View(label="vf", backend=backend))
    (backend.source / "f").write_text("x")
    assert (await ops.lookup(slow, b"f", CTX)).attr_timeout == 60.0
    assert (await ops.lookup(slow, b"missing", CTX)).entry_timeout == 60.0
    assert (await ops.lookup(fast, b"f", CTX)).attr_timeout == ops.cache_timeout
    assert (await ops.lookup(fast, b"missing", CTX)).entry_timeout == ops.cache_timeout


async def test_read_only_views_presented_alike_share_file_inodes(backend):
    """One page cache for every kernel reading a file; each view's own directories."""
    ops = AzfsOperations()
    (backend.source / "d").mkdir()
    (backend.source / "f").write_bytes(b"shared bytes")
    w = ops.attach(["kernels", "kw", "v"], View(label="v", backend=backend))
    r1 = ops.attach(["kernels", "k1", "v"], View(label="v", backend=backend, read_only=True))
    r2 = ops.attach(["kernels", "k2", "v"], View(label="v", backend=backend, read_only=True))
    r3 = ops.attach(["kernels", "k3", "v"], View(label="v", backend=backend, read_only=True,
                                                 uid=1000))
    f1, f2, f3, fw = [await ops.lookup(r, b"f", CTX) for r in (r1, r2, r3, w)]
    assert f1.st_ino == f2.st_ino
    assert len({f1.st_ino, f3.st_ino, fw.st_ino}) == 3  # another uid, a writable view
    d1, d2 = [await ops.lookup(r, b"d", CTX) for r in (r1, r2)]
    assert d1.st_ino != d2.st_ino  # a directory inode has one name only
    shared = f1.st_ino

    # a write through the writable view drops the shared inode's cache once
    info, _ = await ops.create(w, b"f", 0o644, os.O_RDWR, CTX)
    await ops.write(info.fh, 0, b"SHARED")
    await ops.release(info.fh)
    assert shared in ops._stale_inodes and f3.st_ino in ops._stale_inodes

    # the view the inode came from goes: the other one still reads through it
    fi = await ops.open(shared, os.O_RDONLY, CTX)
    ops.detach(["kernels", "k1", "v"])
    assert await ops.read(fi.fh, 0, 12) == b"SHARED bytes"
    assert (await ops.getattr(shared, CTX)).st_size == 12
    ops.detach(["kernels", "k2", "v"])
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.read(fi.fh, 0, 12)
    assert exc.value.errno == 116  # ESTALE: no view shows it any more
    await ops.release(fi.fh)
    table = len(ops.table)
    await ops.forget([(shared, 2)])
    assert len(ops.table) == table - 1 and shared not in ops.table
