"""Removes vfolder directories that no row knows of, left by a crash mid-create.

A create makes ``<volume>/<id hex>`` before it commits the row; a manager
killed between the two leaves a directory without a row.  The sweeper
removes such a directory only when all of these hold, so that it can never
take data or race a create in progress:

* its name is 32 lowercase hex digits (a vfolder id) and no row, in any
  state, has that path on that volume;
* it is older than :data:`MIN_AGE` (no create takes that long);
* it holds nothing but the usage ledger directory.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path

import trio
from sqlalchemy import select
from sqlalchemy.orm import Session

from managerd.db.models import Vfolder
from managerd.db.session import Database
from managerd.errors import ApiError
from managerd.volumes import VolumePool

log = logging.getLogger(__name__)

MIN_AGE = 3600.0
INTERVAL = 3600.0
VFOLDER_DIR = re.compile(r"^[0-9a-f]{32}$")
LEDGER_DIR = ".azfs-meta"


class OrphanSweeper:
    def __init__(self, db: Database, volumes: VolumePool, min_age: float = MIN_AGE,
                 interval: float = INTERVAL) -> None:
        self.db = db
        self.volumes = volumes
        self.min_age = min_age
        self.interval = interval
        self._stop = trio.Event()

    async def run(self) -> None:
        """Sweeps now and then every ``interval`` until :meth:`stop`."""
        while not self._stop.is_set():
            try:
                removed = await self.sweep()
                if removed:
                    log.info("removed %d orphaned vfolder directories", len(removed))
            except Exception:  # noqa: BLE001 - a failed sweep waits for the next one
                log.exception("orphan sweep failed")
            with trio.move_on_after(self.interval):
                await self._stop.wait()

    def stop(self) -> None:
        self._stop.set()

    async def sweep(self) -> list[Path]:
        removed: list[Path] = []
        for volume in await self.volumes.requested():
            try:
                mount = await self.volumes.mount(volume)
                candidates = await self.volumes.storage(
                    self._candidates, mount, what=f"listing volume {volume!r}", volume=volume)
            except ApiError as exc:
                log.warning("orphan sweep skips volume %s: %s", volume, exc.message)
                continue
            if not candidates:
                continue
            known = await self.db.read(_known_paths, volume, [p.name for p in candidates])
            for path in candidates:
                if path.name in known:
                    continue
                try:
                    if await self.volumes.storage(_remove_if_empty, path, volume=volume,
                                                  what="removing an orphaned directory"):
                        log.warning("removed orphaned vfolder directory %s on volume %s",
                                    path.name, volume)
                        removed.append(path)
                except ApiError as exc:
                    log.warning("cannot remove orphan %s: %s", path, exc.message)
        return removed

    def _candidates(self, mount: Path) -> list[Path]:
        cutoff = time.time() - self.min_age
        out = []
        with os.scandir(mount) as entries:
            for entry in entries:
                if VFOLDER_DIR.match(entry.name) and entry.is_dir(follow_symlinks=False) \
                        and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    out.append(Path(entry.path))
        return out


def _known_paths(session: Session, volume: str, names: list[str]) -> set[str]:
    return set(session.scalars(select(Vfolder.path).where(
        Vfolder.volume == volume, Vfolder.path.in_(names))))


def _remove_if_empty(path: Path) -> bool:
    """Removes ``path`` if it holds nothing but the usage ledger; True if removed."""
    entries = os.listdir(path)
    if any(name != LEDGER_DIR for name in entries):
        return False
    if LEDGER_DIR in entries:
        ledger = path / LEDGER_DIR
        if ledger.is_symlink() or not ledger.is_dir():
            return False
        shutil.rmtree(ledger)
    os.rmdir(path)
    return True
