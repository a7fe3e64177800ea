"""A minimal busybox root filesystem for kernel containers.

Good enough to run shell commands as the ``work`` user (uid 1000) in tests
and in the quickstart demo: one static ``busybox`` binary, a symlink per
applet, ``/etc/passwd`` and ``/etc/group`` with ``root`` and ``work``, and
``/home/work`` owned by ``work``.  Built from the node's static busybox
(Debian ``busybox-static``), no image registry needed.

The build goes into a sibling temp directory and is renamed into place, so
a rootfs directory is either complete or absent.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path

from azfs.errors import UserError

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
APPLETS = (
    "sh", "ash", "cat", "ls", "echo", "touch", "mkdir", "rmdir", "rm", "mv", "cp", "ln",
    "stat", "id", "sleep", "dd", "head", "tail", "wc", "grep", "sed", "find", "test",
    "true", "false", "printf", "env", "pwd", "chmod", "sync", "df", "du", "sha256sum",
    "md5sum", "cmp", "diff", "hostname", "mount", "readlink", "realpath", "kill", "ps",
    "uname", "whoami", "xargs", "tr", "sort", "uniq", "seq", "date", "tee", "basename",
    "dirname", "nproc",
)


def find_busybox() -> Path:
    """The node's busybox; it must be statically linked, the rootfs has no libc."""
    for candidate in BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise UserError("busybox not found (install the Debian package busybox-static)")


def _is_static_elf(path: Path) -> bool:
    """True for an ELF file without a PT_INTERP header (no dynamic loader needed)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 52 or head[:4] != b"\x7fELF":
            return False
        wide, order = head[4] == 2, "<" if head[5] == 1 else ">"
        if wide:
            phoff, = struct.unpack_from(order + "Q", head, 32)
            phentsize, phnum = struct.unpack_from(order + "HH", head, 54)
        else:
            phoff, = struct.unpack_from(order + "I", head, 28)
            phentsize, phnum = struct.unpack_from(order + "HH", head, 42)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    pt_interp = 3
    return all(struct.unpack_from(order + "I", table, i * phentsize)[0] != pt_interp
               for i in range(len(table) // phentsize))


def build_busybox_rootfs(dest: str | Path, *, busybox: str | Path | None = None,
                         uid: int = 1000, gid: int = 1000, user: str = "work",
                         applets: Iterable[str] = APPLETS) -> Path:
    """Builds the rootfs at ``dest`` (which must not exist yet) and returns it."""
    dest = Path(dest)
    if dest.exists():
        raise UserError(f"rootfs destination {dest} exists already")
    source = Path(busybox) if busybox else find_busybox()
    if not _is_static_elf(source):
        raise UserError(f"{source} is not a static busybox (install busybox-static)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        _populate(staging, source, uid, gid, user, applets)
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def _populate(root: Path, busybox: Path, uid: int, gid: int, user: str,
              applets: Iterable[str]) -> None:
    root.chmod(0o755)
    for name in ("bin", "etc", "proc", "sys", "dev", "home", "root", "usr/bin", "var"):
        (root / name).mkdir(parents=True, exist_ok=True)
    tmp = root / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    shutil.copy2(busybox, root / "bin" / "busybox")
    (root / "bin" / "busybox").chmod(0o755)
    for applet in applets:
        link = root / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    (root / "usr" / "bin" / "env").symlink_to("/bin/busybox")
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\n"
        f"{user}:x:{uid}:{gid}:{user}:/home/work:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    (root / "etc" / "group").write_text(
        f"root:x:0:\n{user}:x:{gid}:\nnogroup:x:65534:\n")
    (root / "etc" / "hostname").write_text("kernel\n")
    home = root / "home" / "work"
    home.mkdir()
    os.chown(home, uid, gid)
    home.chmod(0o755)
