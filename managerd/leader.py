"""The leader lease: work that must happen once in a cluster runs on one manager only.

Several managers may serve one PostgreSQL database.  Requests are answered
by any of them; the background work (orphan sweeps, undoing creates left
behind by a crash, reconciling agents that came back) runs only on the
manager that holds a PostgreSQL session-level advisory lock.

* The lock lives on a dedicated connection (outside the request pool).  A
  manager that dies — even by SIGKILL — closes that connection and the lock
  is free at once; a manager cut off from the database is dropped by the
  server's TCP keepalives (set on the lock's session) within about
  :data:`KEEPALIVE_BOUND` seconds.
* The holder checks its connection every ``interval`` seconds and stops the
  leader work the moment a check fails or outlasts two intervals (so within
  three intervals, less than :data:`KEEPALIVE_BOUND`: it has stopped before
  the server can give the lock to another); a standby tries to take the
  lock at the same interval, so the work moves to a survivor within about
  ``interval`` seconds of the holder's death.
* SQLite has no cross-process lock of that kind: one manager per SQLite
  database is the only supported case, and that manager is always leader.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)

#: the advisory lock's key: a fixed 63-bit number ("azfs-managerd-leader").
LOCK_KEY = 0x617A_6673_6C64_7201
#: the server drops a vanished holder's session after idle + interval * count seconds.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 10, 5, 3
KEEPALIVE_BOUND = KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT


class LeaderLease:
    """Runs the leader work while this manager holds the lease; standby otherwise."""

    def __init__(self, url: URL, interval: float = 5.0) -> None:
        self.url = url
        self.interval = interval
        self.is_sqlite = url.get_backend_name() == "sqlite"
        self.is_leader = False
        self._engine: Any = None
        self._conn: Any = None
        self._broken = False

    # -- the lock (blocking; called in worker threads) ---------------------------

    def _try_acquire(self) -> bool:
        if self._engine is None:
            self._engine = create_engine(self.url, poolclass=NullPool, pool_pre_ping=False)
        conn = self._engine.connect()
        try:
            conn.execute(text(f"SET tcp_keepalives_idle = {KEEPALIVE_IDLE}"))
            conn.execute(text(f"SET tcp_keepalives_interval = {KEEPALIVE_INTERVAL}"))
            conn.execute(text(f"SET tcp_keepalives_count = {KEEPALIVE_COUNT}"))
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:key)"),
                                    {"key": LOCK_KEY}).scalar())
            conn.commit()
        except BaseException:
            conn.close()
            raise
        if not got:
            conn.close()
            return False
        self._conn = conn
        return True

    def _still_held(self) -> bool:
        """True while the lock's session is alive and still holds the lock."""
        assert self._conn is not None
        held = self._conn.execute(text(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND pid = pg_backend_pid() AND classid::bigint = (:key >> 32) "
            "AND objid::bigint = (:key & 4294967295)"),
            {"key": LOCK_KEY}).scalar()
        self._conn.commit()
        return bool(held)

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        broken, self._broken = self._broken, False
        if conn is None:
            return
        if broken:  # a hung session: drop it without waiting on it
            conn.invalidate()
            return
        try:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})
            conn.commit()
        except Exception:  # noqa: BLE001 - closing the session frees the lock anyway
            log.debug("advisory unlock failed", exc_info=True)
        finally:
            conn.close()

    def close(self) -> None:
        self._release()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # -- the loop -------------------------------------------------------------------

    async def run(self, work: Callable[[], Awaitable[None]]) -> None:
        """Until cancelled: take the lease when free, run ``work`` while it is held."""
        if self.is_sqlite:
            await self._sole(work)
            return
        failing = False
        try:
            while True:
                try:
                    acquired = await trio.to_thread.run_sync(self._try_acquire)
                    failing = False
                except Exception as exc:  # noqa: BLE001 - database down: stay standby
                    if not failing:  # once per outage
                        log.warning("cannot try the leader lease: %s", type(exc).__name__)
                    failing, acquired = True, False
                if acquired:
                    await self._lead(work)
                await trio.sleep(self.interval)
        finally:
            self.is_leader = False
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.close)

    async def _sole(self, work: Callable[[], Awaitable[None]]) -> None:
        """SQLite: the only manager leads for as long as it runs."""
        self.is_leader = True
        log.info("SQLite database: this manager is the only one and runs the leader work")
        try:
            while True:  # work that failed starts again, as a new term would
                await _guarded(work)
                await trio.sleep(self.interval)
        finally:
            self.is_leader = False

    async def _lead(self, work: Callable[[], Awaitable[None]]) -> None:
        self.is_leader = True
        log.info("took the leader lease: running the cluster's background work")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch, nursery.cancel_scope)
                await _guarded(work)
                nursery.cancel_scope.cancel()
        finally:
            self.is_leader = False
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._release)

    async def _watch(self, scope: trio.CancelScope) -> None:
        """Cancels the leader work as soon as the lock cannot be confirmed."""
        while True:
            await trio.sleep(self.interval)
            try:
                with trio.fail_after(max(self.interval, 1.0) * 2):
                    held = await trio.to_thread.run_sync(self._still_held,
                                                         abandon_on_cancel=True)
            except Exception as exc:  # noqa: BLE001 - a failed check is a lost lease
                log.warning("leader lease check failed (%s): stopping the leader work",
                            type(exc).__name__)
                self._broken = True
                held = False
            if not held:
                log.warning("lost the leader lease")
                scope.cancel()
                return


async def _guarded(work: Callable[[], Awaitable[None]]) -> None:
    """Runs the leader work; a bug in it is logged and ends the term, not the manager."""
    try:
        await work()
    except Exception:  # noqa: BLE001 - the API keeps serving; the lease is given up
        log.exception("leader work failed")
