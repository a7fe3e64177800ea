"""``azfs.files.atomic_write``: the one write-then-rename for state, config and secret files.

Real files in a temporary directory.  That the file and the directory are
fsynced is not observable without a crash; what is checked is the rest of
the contract: exact mode whatever the umask, old-or-new for readers, and a
failed write leaves the old file and no temporary behind.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from azfs.files import atomic_write, fsync_directory


@pytest.fixture
def umask():
    """Sets a umask for the test and restores the previous one."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


@pytest.mark.parametrize(("mask", "mode"), [(0o077, 0o644), (0o000, 0o600), (0o022, 0o640)])
def test_the_new_file_has_exactly_the_mode_asked(tmp_path: Path, umask, mask: int,
                                                 mode: int) -> None:
    umask(mask)
    path = tmp_path / "config.yaml"
    atomic_write(path, "a: 1\n", mode)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert path.read_text() == "a: 1\n"


def test_text_and_bytes_and_the_default_mode(tmp_path: Path) -> None:
    atomic_write(tmp_path / "t", "späť\n")
    atomic_write(tmp_path / "b", b"\x00\xff")
    assert (tmp_path / "t").read_bytes() == "späť\n".encode()
    assert (tmp_path / "b").read_bytes() == b"\x00\xff"
    assert stat.S_IMODE((tmp_path / "t").stat().st_mode) == 0o600


def test_a_reader_sees_the_old_or_the_new_file_never_a_mix(tmp_path: Path) -> None:
    path = tmp_path / "journal.json"
    atomic_write(path, "old" * 1000)
    with open(path) as reader:
        atomic_write(path, "new")
        assert reader.read() == "old" * 1000  # the open file is the old one, whole
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.json"]


def test_the_mode_of_the_old_file_does_not_carry_over(tmp_path: Path) -> None:
    path = tmp_path / "token"
    atomic_write(path, "public", 0o644)
    atomic_write(path, "secret", 0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    atomic_write(path, "good", 0o644)
    with pytest.raises(TypeError):
        atomic_write(path, 12345, 0o644)  # type: ignore[arg-type] - fails mid-write
    assert path.read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["settings.json"]


def test_a_failed_rename_leaves_the_target_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "busy"
    target.mkdir()
    (target / "inside").write_text("kept")
    with pytest.raises(IsADirectoryError):
        atomic_write(target, "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    assert (target / "inside").read_text() == "kept"


def test_a_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "nope" / "file", "x")
    assert list(tmp_path.iterdir()) == []


def test_fsync_directory_wants_a_directory(tmp_path: Path) -> None:
    fsync_directory(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        fsync_directory(tmp_path / "f")
