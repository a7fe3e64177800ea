"""Database access from trio: a sync SQLAlchemy engine driven from worker threads.

Every unit of work is a plain function ``fn(session, ...)`` run in one
transaction in a worker thread (``trio.to_thread.run_sync``) under a
``CapacityLimiter`` as large as the connection pool, so that the event loop
never blocks on the database and no request waits for a pooled connection
while holding a thread.

SQLite: WAL journal, foreign keys on, and write transactions start with
``BEGIN IMMEDIATE`` so that two writers queue on the busy timeout instead of
failing with "database is locked" when a read transaction upgrades.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import trio
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import sessionmaker

from managerd.errors import Conflict

T = TypeVar("T")
_local = threading.local()
ATTEMPTS = 3
#: PostgreSQL SQLSTATEs worth a retry: serialization_failure, deadlock_detected.
_RETRY_SQLSTATES = {"40001", "40P01"}


class Database:
    def __init__(self, url: str, threads: int = 8) -> None:
        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self.engine = _engine(url, threads, self.is_sqlite)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.threads = threads
        self._limiter: trio.CapacityLimiter | None = None

    @property
    def limiter(self) -> trio.CapacityLimiter:
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(self.threads)
        return self._limiter

    def call(self, fn: Callable[..., T], *args: Any, write: bool = True) -> T:
        """Runs ``fn(session, *args)`` in one transaction (commit, or rollback on error).

        A deadlock or serialization failure (PostgreSQL) or a busy database
        (SQLite) rolls back and runs ``fn`` again, up to :data:`ATTEMPTS` times;
        a unique-constraint violation that ``fn`` did not handle itself means a
        concurrent request won a race and becomes a ``conflict``.
        """
        _local.write = write
        try:
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    with self._sessions() as session, session.begin():
                        return fn(session, *args)
                except OperationalError as exc:
                    if attempt == ATTEMPTS or not _transient(exc):
                        raise
                except IntegrityError:
                    raise Conflict("a concurrent request changed the same record; retry",
                                   code="conflict") from None
            raise AssertionError("unreachable")
        finally:
            _local.write = True

    async def run(self, fn: Callable[..., T], *args: Any, write: bool = True) -> T:
        """:meth:`call` from trio, in a worker thread."""
        return await trio.to_thread.run_sync(
            lambda: self.call(fn, *args, write=write), limiter=self.limiter)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.run(fn, *args, write=False)

    def dispose(self) -> None:
        self.engine.dispose()


def _engine(url: str, threads: int, is_sqlite: bool) -> Engine:
    if not is_sqlite:
        return create_engine(url, pool_size=threads, max_overflow=0, pool_pre_ping=True)
    engine = create_engine(url, pool_size=threads, max_overflow=0,
                           connect_args={"timeout": 60, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if getattr(_local, "write", True) else "BEGIN")

    return engine


def _transient(exc: OperationalError) -> bool:
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate in _RETRY_SQLSTATES:
        return True
    text = str(exc.orig).lower()
    return "database is locked" in text or "database is busy" in text
