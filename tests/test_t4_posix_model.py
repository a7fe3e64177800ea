"""Reference model: random operation sequences on a vfolder mount and on a plain directory.

The plain directory (same volume, no FUSE) is the model: every operation must
give the same result or the same errno through the mount, and afterwards the
trees must be identical, seen through the mount and in the mount's source.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_libc = ctypes.CDLL(None, use_errno=True)

#: "n" * 255: a name of the longest length (its create once got another mode)
NAMES = ["a", "b", "a/b", "a/c", "b/a", "a/b/c", "c", "n" * 255]
DIRS = ["", *NAMES]
TARGETS = ["a", "b", "c", "a/b", "missing", "b/a"]
#: with group and other write bits: the test runs with umask 0, so the mode asked for
#: is the mode expected (the daemon's own umask must not apply as well)
MODES = [0o600, 0o644, 0o755, 0o700, 0o666, 0o622, 0o620]
OFFSETS = [0, 1, 4095, 4096, 70_000]


def _path(root: Path, rel: str) -> Path:
    return root / rel if rel else root


def _write(root: Path, rel: str, offset: int, size: int, byte: int) -> int:
    fd = os.open(_path(root, rel), os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK, 0o644)
    try:
        return os.pwrite(fd, bytes([byte]) * size, offset)
    finally:
        os.close(fd)


def _append(root: Path, rel: str, size: int, byte: int) -> int:
    fd = os.open(_path(root, rel), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK,
                 0o644)
    try:
        return os.write(fd, bytes([byte]) * size)
    finally:
        os.close(fd)


def _read(root: Path, rel: str, nofollow: bool = False) -> bytes:
    flags = os.O_RDONLY | os.O_NONBLOCK | (os.O_NOFOLLOW if nofollow else 0)
    fd = os.open(_path(root, rel), flags)
    try:
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


def _create_excl(root: Path, rel: str, mode: int) -> None:
    os.close(os.open(_path(root, rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))


def _open_trunc(root: Path, rel: str) -> None:
    os.close(os.open(_path(root, rel), os.O_WRONLY | os.O_TRUNC | os.O_NONBLOCK))


def _stat(root: Path, rel: str, follow: bool) -> tuple:
    st_ = os.stat(_path(root, rel), follow_symlinks=follow)
    size = None if stat.S_ISDIR(st_.st_mode) else st_.st_size
    return stat.S_IFMT(st_.st_mode), stat.S_IMODE(st_.st_mode), st_.st_nlink, size


def _renameat2(root: Path, old: str, new: str, flags: int) -> None:
    rc = _libc.renameat2(-100, os.fsencode(_path(root, old)), -100,
                         os.fsencode(_path(root, new)), flags)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


OPS = {
    "write": _write,
    "append": _append,
    "read": _read,
    "create_excl": _create_excl,
    "open_trunc": _open_trunc,
    "truncate": lambda r, p, n: os.truncate(_path(r, p), n),
    "mkdir": lambda r, p, m: os.mkdir(_path(r, p), m),
    "rmdir": lambda r, p: os.rmdir(_path(r, p)),
    "unlink": lambda r, p: os.unlink(_path(r, p)),
    "rename": lambda r, a, b: os.rename(_path(r, a), _path(r, b)),
    "renameat2": _renameat2,
    "link": lambda r, a, b: os.link(_path(r, a), _path(r, b), follow_symlinks=False),
    "symlink": lambda r, t, p: os.symlink(t, _path(r, p)),
    "readlink": lambda r, p: os.readlink(_path(r, p)),
    "mkfifo": lambda r, p: os.mkfifo(_path(r, p), 0o644),
    "chmod": lambda r, p, m: os.chmod(_path(r, p), m),
    "stat": _stat,
    "listdir": lambda r, p: sorted(os.listdir(_path(r, p))),
    "setxattr": lambda r, p, v: os.setxattr(_path(r, p), "user.k", v),
    "getxattr": lambda r, p: os.getxattr(_path(r, p), "user.k"),
}

#: every sequence starts from this small tree, so that most operations have something to act on
SETUP = [("mkdir", "a", 0o755), ("mkdir", "b", 0o755), ("write", "c", 0, 100, 65),
         ("write", "a/c", 0, 5000, 66), ("symlink", "c", "b/a"), ("mkdir", "a/b", 0o700)]

name = st.sampled_from(NAMES)
operation = st.one_of(
    st.tuples(st.just("write"), name, st.sampled_from(OFFSETS), st.integers(0, 9000),
              st.integers(0, 255)),
    st.tuples(st.just("append"), name, st.integers(0, 5000), st.integers(0, 255)),
    st.tuples(st.just("read"), name, st.booleans()),
    st.tuples(st.just("create_excl"), name, st.sampled_from(MODES)),
    st.tuples(st.just("open_trunc"), name),
    st.tuples(st.just("truncate"), name, st.sampled_from([0, 1, 4096, 10_000])),
    st.tuples(st.just("mkdir"), name, st.sampled_from(MODES)),
    st.tuples(st.just("rmdir"), name),
    st.tuples(st.just("unlink"), name),
    st.tuples(st.just("rename"), name, name),
    st.tuples(st.just("renameat2"), name, name, st.sampled_from([1, 2])),
    st.tuples(st.just("link"), name, name),
    st.tuples(st.just("symlink"), st.sampled_from(TARGETS), name),
    st.tuples(st.just("readlink"), name),
    st.tuples(st.just("mkfifo"), name),
    st.tuples(st.just("chmod"), name, st.sampled_from(MODES)),
    st.tuples(st.just("stat"), st.sampled_from(DIRS), st.booleans()),
    st.tuples(st.just("listdir"), st.sampled_from(DIRS)),
    st.tuples(st.just("setxattr"), name, st.binary(max_size=20)),
    st.tuples(st.just("getxattr"), name),
)


def apply(root: Path, op: tuple) -> tuple:
    kind, *args = op
    try:
        return ("ok", OPS[kind](root, *args))
    except OSError as exc:
        return ("error", errno.errorcode.get(exc.errno or 0, exc.errno))


def tree(root: Path) -> dict[str, tuple]:
    """Everything observable about a tree except times and inode numbers."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st_ = os.lstat(p)
            kind = stat.S_IFMT(st_.st_mode)
            extra: object = None
            if kind == stat.S_IFREG:
                extra = p.read_bytes()
            elif kind == stat.S_IFLNK:
                extra = os.readlink(p)
            xattr = None
            if kind in (stat.S_IFREG, stat.S_IFDIR):
                try:
                    xattr = os.getxattr(p, "user.k", follow_symlinks=False)
                except OSError:
                    pass
            out[str(p.relative_to(root))] = (
                kind, stat.S_IMODE(st_.st_mode), st_.st_nlink,
                None if kind == stat.S_IFDIR else st_.st_size, extra, xattr)
    return out


#: a daemon that may hold only a few dozen node descriptors: most nodes get evicted and
#: reopened by name, which must never change what the operations see
TIGHT_DESCRIPTORS = ["setpriv", "--bounding-set", "-sys_resource",
                     "prlimit", "--nofile=300:300", "--"]


@pytest.mark.parametrize("prefix", [[], TIGHT_DESCRIPTORS], ids=["default", "tight-fds"])
def test_random_operations_match_a_plain_directory(mounted, tmp_path, prefix):
    m = mounted("--xattrs", prefix=prefix)
    plain = tmp_path / "plain"
    plain.mkdir()
    counter = itertools.count()

    @settings(max_examples=60, deadline=None, derandomize=False,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    @given(st.lists(operation, min_size=15, max_size=40))
    def check(ops: list[tuple]) -> None:
        n = next(counter)
        via_mount, model = m.mnt / f"ex{n}", plain / f"ex{n}"
        via_mount.mkdir()
        model.mkdir()
        for i, op in enumerate(SETUP + ops):
            got, want = apply(via_mount, op), apply(model, op)
            assert got == want, f"step {i} {op}: mount gave {got}, plain dir gave {want}"
        assert tree(via_mount) == tree(model)
        assert tree(m.source / f"ex{n}") == tree(model)

    old = os.umask(0)
    try:
        check()
    finally:
        os.umask(old)
