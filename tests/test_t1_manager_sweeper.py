"""The orphan sweeper on a real bind volume and a real SQLite database.

Only an old, empty directory named like a vfolder id that no row knows of is
removed; anything with data, anything recent, anything with a row, and
anything not named like an id stays.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from managerd.auth import Principal
from managerd.config import ManagerConfig
from managerd.services.users import create_user
from managerd.state import Manager
from managerd.sweeper import OrphanSweeper
from managerd.usage import init_usage
from tests.test_t5_manager_api import _unmount_under


def _age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


async def test_sweeper_removes_only_old_empty_unknown_dirs(tmp_path: Path) -> None:
    volume = tmp_path / "vol"
    volume.mkdir()
    (tmp_path / "volumes.yaml").write_text(
        f"volumes:\n  - {{name: vol, mount: {{at: requested, fstype: bind, path: {volume}}}}}\n")
    manager = Manager(ManagerConfig(state_dir=tmp_path / "state",
                                    volumes_file=tmp_path / "volumes.yaml"))
    try:
        await manager.start()
        _, _token = manager.db.call(lambda s: create_user(s, "olive"))
        who = Principal(1, "olive", False, 1000, 1000)
        known = await manager.vfolders.create(who, "kept")
        trashed = await manager.vfolders.create(who, "trashed")
        await manager.vfolders.trash(who, "trashed")
        mount = await manager.volumes.mount("vol")
        paths = {}
        for name in ("orphan", "recent", "with_data"):
            paths[name] = mount / uuid.uuid4().hex
            paths[name].mkdir()
            init_usage(paths[name])
        (paths["with_data"] / "results.csv").write_text("1,2,3\n")
        paths["not_an_id"] = mount / "lost+found"
        paths["not_an_id"].mkdir()
        for name in ("orphan", "with_data", "not_an_id"):
            _age(paths[name], 7200)
        for vf in (known, trashed):
            _age(mount / vf["path"], 7200)
        sweeper = OrphanSweeper(manager.db, manager.volumes)
        removed = await sweeper.sweep()
        assert removed == [paths["orphan"]]
        assert not paths["orphan"].exists()
        for name in ("recent", "with_data", "not_an_id"):
            assert paths[name].exists(), name
        assert (mount / known["path"]).is_dir() and (mount / trashed["path"]).is_dir()
        assert await sweeper.sweep() == []
    finally:
        await manager.close()
        _unmount_under(tmp_path)
