"""Reading the kernel's mount table (``/proc/self/mountinfo``), the only truth about mounts."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True, slots=True)
class MountEntry:
    mount_id: int
    mountpoint: str
    fstype: str
    source: str
    options: str


def read_mounts(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    out = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            fields = left.split(" ")
            rfields = right.split(" ")
            if len(fields) < 6 or len(rfields) < 2:
                continue
            out.append(MountEntry(int(fields[0]), _unescape(fields[4]), rfields[0],
                                  _unescape(rfields[1]), rfields[2] if len(rfields) > 2 else ""))
    return out


def find_mount(mountpoint: str | os.PathLike[str]) -> MountEntry | None:
    """The top-most mount at exactly ``mountpoint`` (not following symlinks)."""
    target = os.path.normpath(os.path.abspath(os.fspath(mountpoint)))
    found = None
    for entry in read_mounts():
        if entry.mountpoint == target:
            found = entry
    return found


def is_within(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    p, r = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    return p == r or r in p.parents
