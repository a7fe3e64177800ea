"""A real PostgreSQL 15 server for tests: temp data dir, free loopback port.

``initdb`` + ``postgres`` from the Debian packages, run as the ``postgres``
user when the tests run as root (PostgreSQL refuses to run as root), on a
data dir that user owns.  Use the session-scoped fixture and make one
database per test::

    from tests.support.postgres import postgres  # noqa: F401

    def test_x(postgres):
        url = postgres.new_database()   # postgresql+psycopg://...

The server is always stopped and its directory removed when the session ends.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.services import (
    free_port,
    missing_service,
    port_open,
    stop_process,
    wait_until,
)

PG_BIN = Path(os.environ.get("AZFS_PG_BIN", "/usr/lib/postgresql/15/bin"))
SUPERUSER = "azfs"


class Postgres:
    """One PostgreSQL server; :meth:`new_database` hands out empty databases."""

    def __init__(self, workdir: Path, fsync: bool = False) -> None:
        self.workdir = workdir
        #: tests run without fsync (speed); benchmarks keep it, as production does
        self.fsync = fsync
        self.data = workdir / "data"
        self.log = workdir / "postgres.log"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self._names = itertools.count(1)
        self._run_as: list[str] = []
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                missing_service("running as root and there is no 'postgres' user")
            os.chown(workdir, pw.pw_uid, pw.pw_gid)
            self._run_as = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
                            "--clear-groups", "--"]

    @property
    def base_url(self) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}"

    def start(self) -> None:
        if not (PG_BIN / "postgres").exists():
            missing_service(f"PostgreSQL binaries not found in {PG_BIN}")
        if not self.data.exists():
            subprocess.run([*self._run_as, str(PG_BIN / "initdb"), "-D", str(self.data),
                            "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-sync",
                            "--no-instructions"],
                           check=True, capture_output=True, cwd=self.workdir)
        cmd = [*self._run_as, str(PG_BIN / "postgres"), "-D", str(self.data),
               "-h", "127.0.0.1", "-p", str(self.port), "-k", str(self.workdir),
               "-c", f"fsync={'on' if self.fsync else 'off'}", "-c", "max_connections=200",
               "-c", "shared_buffers=64MB"]
        with open(self.log, "ab") as out:
            os.chmod(self.log, 0o666)
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         cwd=self.workdir)
        wait_until(self._ready, 30, "postgres", self.proc, self.log)

    def _ready(self) -> bool:
        if not port_open(self.port):
            return False
        import psycopg
        try:
            with psycopg.connect(self._dsn("postgres"), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def _dsn(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """Creates an empty database; returns its SQLAlchemy URL (psycopg 3 driver)."""
        import psycopg
        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self._dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"{self.base_url}/{name}"

    def stop(self) -> None:
        """Fast shutdown (SIGINT: disconnect clients), then the generic stop."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            stop_process(self.proc)
            self.proc = None


@contextlib.contextmanager
def running_postgres(fsync: bool = False) -> Iterator[Postgres]:
    workdir = Path(tempfile.mkdtemp(prefix="azfs-pg-"))
    server = Postgres(workdir, fsync=fsync)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    with running_postgres() as server:
        yield server
