"""What is mounted where, read from ``/proc/self/mountinfo``.

Host mounting never trusts its own memory of what it mounted: a mount may
have been removed by an operator, left behind by a crashed run, or have gone
stale.  This module parses the kernel's table (see proc(5)).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    root: str
    mount_point: str
    mount_options: str
    fstype: str
    source: str
    super_options: str
    #: "major:minor" of the mounted filesystem (its backing-dev-info in /sys/class/bdi)
    device: str = ""


def unescape(field: str) -> str:
    """Undoes the kernel's octal escapes (``\\040`` for a space...)."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_line(line: str) -> MountEntry:
    left, sep, right = line.rstrip("\n").partition(" - ")
    if not sep:
        raise ValueError(f"malformed mountinfo line: {line!r}")
    fields = left.split(" ")
    fstype, source, super_options = (right.split(" ") + ["", "", ""])[:3]
    return MountEntry(
        mount_id=int(fields[0]), parent_id=int(fields[1]), root=unescape(fields[3]),
        mount_point=unescape(fields[4]), mount_options=fields[5], fstype=fstype,
        source=unescape(source), super_options=super_options, device=fields[2],
    )


def read_mountinfo(path: Path = MOUNTINFO) -> list[MountEntry]:
    with open(path, encoding="utf-8", errors="surrogateescape") as table:
        return [parse_line(line) for line in table if line.strip()]


def mounts_at(mount_point: str | os.PathLike[str], path: Path = MOUNTINFO) -> list[MountEntry]:
    """Every mount whose mount point is exactly ``mount_point`` (stacked mounts too)."""
    target = os.path.abspath(mount_point)
    return [e for e in read_mountinfo(path) if e.mount_point == target]


def is_mounted(mount_point: str | os.PathLike[str], path: Path = MOUNTINFO) -> bool:
    return bool(mounts_at(mount_point, path))


def mounts_under(directory: str | os.PathLike[str], path: Path = MOUNTINFO) -> list[MountEntry]:
    """Mounts strictly below ``directory`` (used to clean up a state directory)."""
    prefix = os.path.abspath(directory).rstrip("/") + "/"
    return [e for e in read_mountinfo(path) if e.mount_point.startswith(prefix)]


def find_mount(mount_point: str | os.PathLike[str], path: Path = MOUNTINFO) -> MountEntry | None:
    """The top-most mount at exactly ``mount_point``, or None."""
    entries = mounts_at(mount_point, path)
    return entries[-1] if entries else None


def is_within(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is ``root`` or below it, symlinks resolved."""
    p, r = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    return p == r or r in p.parents
