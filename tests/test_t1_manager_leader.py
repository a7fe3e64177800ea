"""The leader lease on a real PostgreSQL: one holder at a time, and it moves.

Three leases race for one database.  Exactly one runs the leader work; when
it stops, another takes over; when the holder's database session is killed
under it (``pg_terminate_backend``, as when the server drops a manager cut
off from the network), the holder stops its work and another takes over.
On SQLite the one manager is always leader.  The cluster settings are
checked when the config is loaded.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
import trio
from sqlalchemy.engine import make_url

from azfs.errors import UserError
from managerd.config import ManagerConfig
from managerd.leader import LeaderLease
from tests.support.postgres import postgres  # noqa: F401

INTERVAL = 0.2


class Worker:
    """A lease and the leader work it runs: records whether the work is running."""

    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.lease = LeaderLease(make_url(url), INTERVAL)
        self.working = False
        self.scope = trio.CancelScope()

    async def work(self) -> None:
        self.working = True
        try:
            await trio.sleep_forever()
        finally:
            self.working = False

    async def run(self) -> None:
        with self.scope:
            await self.lease.run(self.work)


async def wait_for(predicate, what: str, timeout: float = 15.0) -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"{what}: not within {timeout}s")


def _holder_pid(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory' "
                            "AND granted").fetchall()
    assert len(rows) == 1, rows
    return rows[0][0]


async def test_one_holder_and_failover(postgres) -> None:  # noqa: F811
    url = postgres.new_database()
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    workers = [Worker(n, url) for n in ("a", "b", "c")]

    def leaders() -> list[Worker]:
        found = [w for w in workers if w.working]
        assert len(found) <= 1, [w.name for w in found]
        assert [w.name for w in workers if w.lease.is_leader] == [w.name for w in found]
        return found

    async with trio.open_nursery() as nursery:
        for w in workers:
            nursery.start_soon(w.run)
        await wait_for(lambda: len(leaders()) == 1, "a first leader")
        first = leaders()[0]
        for _ in range(10):  # it stays the only one while it lives
            await trio.sleep(INTERVAL)
            assert leaders() == [first]

        first.scope.cancel()  # the holder stops (or its process dies)
        await wait_for(lambda: len(leaders()) == 1 and leaders()[0] is not first,
                       "a second leader")
        second = leaders()[0]

        # the database drops the holder's session: it stops its work, another takes over
        await trio.to_thread.run_sync(lambda: psycopg.connect(dsn, autocommit=True).execute(
            "SELECT pg_terminate_backend(%s)", (_holder_pid(dsn),)).connection.close())
        await wait_for(lambda: not second.working, "the second leader stops its work")
        await wait_for(lambda: len(leaders()) == 1, "a third leader")
        nursery.cancel_scope.cancel()
    assert not any(w.working or w.lease.is_leader for w in workers)


async def test_sqlite_is_always_leader(tmp_path: Path) -> None:
    worker = Worker("only", f"sqlite:///{tmp_path / 'm.db'}")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.run)
        await wait_for(lambda: worker.working and worker.lease.is_leader, "the leader work")
        nursery.cancel_scope.cancel()
    assert not worker.working


@pytest.mark.parametrize("values, message", [
    ({"leader_interval": 9}, "leader_interval must be at most 8 s"),
    ({"leader_interval": 0}, "must be positive"),
    ({"reconcile_interval": -1}, "must be positive"),
    ({"sweep_min_age": -5}, "sweep_min_age >= 0"),
])
def test_cluster_settings_are_checked(values: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        ManagerConfig.from_mapping(values)


def test_cluster_settings_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "managerd.toml"
    path.write_text("leader_interval = 2\nreconcile_interval = 3\nsweep_interval = 60\n")
    config = ManagerConfig.load(path, env={})
    assert (config.leader_interval, config.reconcile_interval, config.sweep_interval) == (
        2.0, 3.0, 60.0)
    assert config.stale_create_age == 2 * config.agent_timeout + 30
