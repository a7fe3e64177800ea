"""Containment: nothing done through a vfolder mount reaches a file outside its source.

Symlinks are followed by the *caller's* kernel path walk in the caller's
namespace, never by the daemon; so the meaningful checks are that the daemon
shows links verbatim, acts on the link itself, and keeps using the objects it
resolved even when the tree is rearranged under it.  The layouts put the
source and the mountpoint at different depths, so a relative link that would
leave the source (as the daemon would see it) points somewhere harmless and
missing from the mountpoint's side.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from azfs.backends.posix import PosixBackend
from azfs.errors import InvalidArgument
from tests.support.fuse import as_user, errno_of
from tests.support.poll import wait_until


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """src = T/a/src, mnt = T/b/c/mnt, outside = T/a/outside ('../outside' from src)."""
    paths = {"src": tmp_path / "a" / "src", "mnt": tmp_path / "b" / "c" / "mnt",
             "outside": tmp_path / "a" / "outside"}
    for p in paths.values():
        p.mkdir(parents=True)
    (paths["outside"] / "victim").write_text("outside data")
    os.chmod(paths["outside"] / "victim", 0o644)
    os.utime(paths["outside"] / "victim", ns=(10**18, 10**18))
    return paths


def snapshot(root: Path) -> dict[str, tuple]:
    """Names, types, modes, owners, times and contents of a tree (links not followed)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            data = p.read_bytes() if stat.S_ISREG(st.st_mode) else None
            out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid,
                                             st.st_mtime_ns, st.st_size, data)
    return out


def test_absolute_symlink_is_shown_verbatim(mounted):
    m = mounted()
    os.symlink("/etc/shadow", m.source / "shadow")
    assert os.readlink(m.mnt / "shadow") == "/etc/shadow"
    assert stat.S_ISLNK(os.lstat(m.mnt / "shadow").st_mode)
    os.symlink("/etc/passwd", m.mnt / "made")
    assert os.readlink(m.source / "made") == "/etc/passwd"


def test_relative_escape_link_ops_act_on_the_link(mounted, layout):
    m = mounted(source=layout["src"], mnt=layout["mnt"])
    os.symlink("../../outside/victim", layout["src"] / "link")
    os.symlink("../outside", layout["src"] / "dirlink")
    before = snapshot(layout["outside"])
    link = m.mnt / "link"
    assert os.readlink(link) == "../../outside/victim"
    assert os.readlink(m.mnt / "dirlink") == "../outside"
    os.lchown(link, 1234, 4321)
    st = os.lstat(layout["src"] / "link")
    assert (st.st_uid, st.st_gid) == (1234, 4321)
    os.utime(link, ns=(5 * 10**17, 5 * 10**17), follow_symlinks=False)
    assert os.lstat(layout["src"] / "link").st_mtime_ns == 5 * 10**17
    assert os.lstat(link).st_mtime_ns == 5 * 10**17
    # following the link happens in our namespace, where it leads nowhere
    assert errno_of(lambda: os.chmod(link, 0o777)) == errno.ENOENT
    assert errno_of(lambda: open(link, "w")) == errno.ENOENT
    assert errno_of(lambda: os.listdir(m.mnt / "dirlink")) == errno.ENOENT
    assert errno_of(lambda: os.setxattr(link, "user.x", b"1",
                                        follow_symlinks=False)) == errno.EPERM
    os.unlink(link)
    assert snapshot(layout["outside"]) == before
    assert not os.path.lexists(layout["src"] / "link")


def test_dotdot_at_the_root_stays_outside_azfs(mounted, layout):
    m = mounted(source=layout["src"], mnt=layout["mnt"])
    (layout["src"] / "inside").touch()
    up = m.mnt / ".."
    assert sorted(os.listdir(up)) == sorted(os.listdir(layout["mnt"].parent))
    assert os.stat(up).st_ino == os.stat(layout["mnt"].parent).st_ino
    assert os.stat(up).st_dev != os.stat(m.mnt).st_dev
    # '..' of a subdirectory is its parent inside the vfolder
    (m.mnt / "d").mkdir()
    assert os.stat(m.mnt / "d" / "..").st_ino == os.stat(m.mnt).st_ino
    assert sorted(os.listdir(m.mnt / "d" / ".." / "..")) == \
        sorted(os.listdir(layout["mnt"].parent))
    fd = os.open(m.mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        try:
            assert sorted(os.listdir(parent)) == ["d", "inside"]
            grand = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=parent)
            try:
                assert os.fstat(grand).st_ino == os.stat(layout["mnt"].parent).st_ino
            finally:
                os.close(grand)
        finally:
            os.close(parent)
    finally:
        os.close(fd)
    assert "victim" not in os.listdir(layout["mnt"].parent)


def test_directory_swapped_for_symlink_during_a_walk(mounted, layout):
    """Held directory handles keep naming the directory the daemon resolved, not the link."""
    src, outside = layout["src"], layout["outside"]
    m = mounted("--cache-timeout", "0.1", source=src, mnt=layout["mnt"])
    (m.mnt / "d" / "e").mkdir(parents=True)
    (m.mnt / "d" / "e" / "old").write_text("inside")
    held_d = os.open(m.mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
    held_e = os.open(m.mnt / "d" / "e", os.O_RDONLY | os.O_DIRECTORY)
    before = snapshot(outside)
    try:
        os.rename(src / "d", src / "moved")
        os.symlink("../outside", src / "d")
        # create / open / list / remove through the already-open directories
        fd = os.open("new", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=held_d)
        os.write(fd, b"new data")
        os.close(fd)
        fd = os.open("deep", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=held_e)
        os.close(fd)
        fresh = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=held_d)
        try:
            assert sorted(os.listdir(fresh)) == ["e", "new"]
        finally:
            os.close(fresh)
        fd = os.open("old", os.O_RDONLY, dir_fd=held_e)
        assert os.read(fd, 100) == b"inside"
        os.close(fd)
        assert errno_of(lambda: os.open("victim", os.O_RDONLY, dir_fd=held_d)) == errno.ENOENT
        os.mkdir("sub", dir_fd=held_d)
        os.symlink("x", "lnk", dir_fd=held_d)
        os.rename("new", "renamed", src_dir_fd=held_d, dst_dir_fd=held_d)
        assert errno_of(lambda: os.unlink("victim", dir_fd=held_d)) == errno.ENOENT
    finally:
        os.close(held_d)
        os.close(held_e)
    assert (src / "moved" / "renamed").read_text() == "new data"
    assert (src / "moved" / "e" / "deep").exists()
    assert (src / "moved" / "sub").is_dir()
    # a fresh path walk sees the link, followed in our namespace (where it is missing)
    wait_until(lambda: stat.S_ISLNK(os.lstat(m.mnt / "d").st_mode), timeout=10,
               what="the link once the cached entry expired")
    assert errno_of(lambda: open(m.mnt / "d" / "x", "w")) == errno.ENOENT
    assert snapshot(outside) == before


def test_parent_swapped_during_lookups(mounted, layout):
    """Swapping the directory back and forth while walking never lists the outside dir."""
    src, outside = layout["src"], layout["outside"]
    m = mounted("--cache-timeout", "0", source=src, mnt=layout["mnt"])
    (src / "d").mkdir()
    (src / "d" / "own").write_text("own")
    before = snapshot(outside)
    seen: set[str] = set()
    outcomes: dict[bool, list[int]] = {True: [], False: []}  # swapped → errnos (0 = ok)
    for i in range(30):
        swapped = bool(i % 2)
        if swapped:
            os.rename(src / "d", src / "real")
            os.symlink("../outside", src / "d")
        elif os.path.islink(src / "d"):
            os.unlink(src / "d")
            os.rename(src / "real", src / "d")

        def walk() -> None:
            seen.update(os.listdir(m.mnt / "d"))
            with open(m.mnt / "d" / "probe", "a") as f:
                f.write("x")

        outcomes[swapped].append(errno_of(walk))
    assert "victim" not in seen
    assert snapshot(outside) == before
    # swapped in: the link is followed in our namespace, where it leads nowhere
    assert set(outcomes[True]) <= {errno.ENOENT, errno.ENOTDIR, errno.ESTALE}, outcomes
    assert 0 not in outcomes[True]
    # the real directory back in place: listed and written every time
    assert outcomes[False] == [0] * 15, outcomes
    assert seen == {"own", "probe"}
    assert (src / "real" / "probe").read_text() == "x" * 15  # the last round swapped


@pytest.mark.parametrize("name", ["a/b", "..", ".", "", "x\0y", "../outside", "/etc"])
async def test_backend_refuses_names_with_slash_nul_or_dots(tmp_path, name):
    """The kernel never sends such names; the backend refuses them anyway (in-process)."""
    (tmp_path / "src").mkdir()
    backend = PosixBackend(tmp_path / "src")
    await backend.start()
    try:
        root = backend.root()
        for call in (lambda: backend.lookup(root, name),
                     lambda: backend.mkdir(root, name, 0o755),
                     lambda: backend.create(root, name, 0o644, os.O_WRONLY),
                     lambda: backend.symlink(root, name, b"x"),
                     lambda: backend.unlink(root, name)):
            with pytest.raises(InvalidArgument):
                await call()
    finally:
        await backend.close()
    assert sorted(os.listdir(tmp_path)) == ["src"]


async def test_backend_refuses_long_names(tmp_path):
    backend = PosixBackend(tmp_path)
    await backend.start()
    try:
        with pytest.raises(OSError) as info:
            await backend.lookup(backend.root(), "x" * 256)
        assert info.value.errno == errno.ENAMETOOLONG
    finally:
        await backend.close()


def test_reserved_meta_dir_is_invisible_and_untouchable(mounted):
    m = mounted()
    meta = m.mnt / ".azfs-meta"
    assert (m.source / ".azfs-meta").is_dir()  # the ledger is there...
    assert ".azfs-meta" not in os.listdir(m.mnt)  # ...but not shown
    assert errno_of(lambda: os.stat(meta)) == errno.ENOENT
    assert errno_of(lambda: os.stat(meta / "usage.json")) == errno.ENOENT
    assert errno_of(lambda: os.mkdir(meta)) == errno.EPERM
    assert errno_of(lambda: os.open(meta, os.O_CREAT | os.O_WRONLY)) == errno.EPERM
    assert errno_of(lambda: os.symlink("x", meta)) == errno.EPERM
    assert errno_of(lambda: os.mkfifo(meta)) == errno.EPERM
    (m.mnt / "f").touch()
    (m.mnt / "d").mkdir()
    assert errno_of(lambda: os.rename(m.mnt / "f", meta)) == errno.EPERM
    assert errno_of(lambda: os.rename(m.mnt / "d", meta)) == errno.EPERM
    assert errno_of(lambda: os.link(m.mnt / "f", meta)) == errno.EPERM
    assert (m.source / ".azfs-meta" / "usage.json").exists()
    # the name is only reserved at the root
    (m.mnt / "d" / ".azfs-meta").mkdir()
    assert os.listdir(m.mnt / "d") == [".azfs-meta"]


def test_new_symlink_given_to_the_caller_leaves_its_target_alone(mounted, layout):
    """The daemon chowns a new symlink to its creator: the link itself, never its target."""
    m = mounted(source=layout["src"], mnt=layout["mnt"])
    victim = layout["outside"] / "victim"
    (layout["src"] / "root-file").write_text("root's")
    shared = m.mnt / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)

    def work() -> None:
        os.symlink(str(victim), "abs")
        os.symlink("../root-file", "rel")

    as_user(1000, 1000, work, cwd=shared)
    for name in ("abs", "rel"):
        st = os.lstat(layout["src"] / "shared" / name)
        assert (st.st_uid, st.st_gid) == (1000, 1000)
    for target in (victim, layout["src"] / "root-file"):
        st = os.stat(target)
        assert (st.st_uid, st.st_gid) == (0, 0)


def test_hard_link_of_a_symlink_links_the_symlink(mounted, layout):
    m = mounted(source=layout["src"], mnt=layout["mnt"])
    victim = layout["outside"] / "victim"
    os.symlink(str(victim), layout["src"] / "abs")
    os.link(m.mnt / "abs", m.mnt / "hard", follow_symlinks=False)
    assert stat.S_ISLNK(os.lstat(layout["src"] / "hard").st_mode)
    assert os.readlink(layout["src"] / "hard") == str(victim)
    assert os.stat(victim).st_nlink == 1


def test_xattrs_of_a_symlink_are_its_own(mounted, layout):
    m = mounted("--xattrs", source=layout["src"], mnt=layout["mnt"])
    victim = layout["outside"] / "victim"
    os.setxattr(victim, "user.secret", b"outside")
    os.symlink(str(victim), layout["src"] / "abs")
    got = errno_of(lambda: os.getxattr(m.mnt / "abs", "user.secret", follow_symlinks=False))
    assert got == errno.ENODATA
    assert os.listxattr(m.mnt / "abs", follow_symlinks=False) == []


#: a daemon that may hold only a few dozen node descriptors (evicted ones are reopened)
TIGHT_DESCRIPTORS = ["setpriv", "--bounding-set", "-sys_resource",
                     "prlimit", "--nofile=300:300", "--"]


def test_evicted_directories_are_never_reopened_through_a_swapped_in_link(mounted, layout):
    """With descriptors evicted, a held directory is reopened by name: the link swapped
    in its place must give ESTALE (or the original directory), never the outside."""
    src, outside = layout["src"], layout["outside"]
    # the kernel keeps e's attributes for the whole test: listdir's fstat of the handle
    # is not asked of the daemon (which, asked, would answer ESTALE: e's name now leads
    # to the link), so the listing shows what the handle itself holds
    m = mounted("--cache-timeout", "60", source=src, mnt=layout["mnt"],
                prefix=TIGHT_DESCRIPTORS)
    (m.mnt / "d" / "e").mkdir(parents=True)
    held_e = os.open(m.mnt / "d" / "e", os.O_RDONLY | os.O_DIRECTORY)
    before = snapshot(outside)
    try:
        (src / "many").mkdir()
        for i in range(400):
            (src / "many" / f"f{i}").touch()
        for name in os.listdir(m.mnt / "many"):  # pushes d and e out of the pool
            # (listed entries hold no descriptor; an open gives each one)
            os.close(os.open(m.mnt / "many" / name, os.O_RDONLY))
        os.rename(src / "d", src / "moved")
        os.symlink("../outside", src / "d")
        # e's descriptor was evicted: reopening it by name meets the link, so every
        # operation through it is ESTALE, and nothing reaches the outside
        for attempt in (
            lambda: os.close(os.open("new", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=held_e)),
            lambda: os.mkdir("sub", dir_fd=held_e),
            lambda: os.open("victim", os.O_RDONLY, dir_fd=held_e),
        ):
            err = errno_of(attempt)
            assert err == errno.ESTALE, os.strerror(err) if err else "succeeded"
        # the handle's listing is the snapshot of its own directory taken at opendir
        # (empty), never the outside's ("victim"); listing it anew is ESTALE
        assert os.listdir(held_e) == []
        assert errno_of(lambda: os.listdir(held_e)) == errno.ESTALE
        assert snapshot(outside) == before
        # with the real directory back in its place, the same handle works again
        os.unlink(src / "d")
        os.rename(src / "moved", src / "d")
        os.close(os.open("new", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=held_e))
        os.mkdir("sub", dir_fd=held_e)
        assert sorted(os.listdir(held_e)) == ["new", "sub"]
    finally:
        os.close(held_e)
    assert snapshot(outside) == before
    assert not (outside / "new").exists() and not (outside / "sub").exists()
    assert (src / "d" / "e" / "new").is_file() and (src / "d" / "e" / "sub").is_dir()


def test_many_files_with_a_tight_descriptor_budget(mounted):
    m = mounted(prefix=TIGHT_DESCRIPTORS)
    for d in range(5):
        (m.mnt / f"d{d}").mkdir()
        for i in range(100):
            (m.mnt / f"d{d}" / f"f{i}").write_text(f"{d}/{i}")
    os.rename(m.mnt / "d0", m.mnt / "d4" / "moved")
    os.rename(m.mnt / "d1" / "f5", m.mnt / "d2" / "g5")
    out = subprocess.run(["ls", "-lR", str(m.mnt)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[:300]
    for i in range(100):
        assert (m.mnt / "d4" / "moved" / f"f{i}").read_text() == f"0/{i}"
    assert (m.mnt / "d2" / "g5").read_text() == "1/5"
    assert (m.source / "d2" / "g5").read_text() == "1/5"
