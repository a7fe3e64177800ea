"""The manager's records on real SQLite and PostgreSQL: migrations, invariants, tokens.

No HTTP here: the units of work and the Alembic migrations are called
directly, against a SQLite file and a PostgreSQL 15 server started by the
fixture.
"""

from __future__ import annotations

import uuid

import pytest
import trio
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select, text

from managerd import auth
from managerd.db import migrate
from managerd.db.models import DELETE_COMPLETE, Base, Token, User, Vfolder
from managerd.db.session import Database
from managerd.errors import Conflict, Unauthenticated
from managerd.services.users import create_user
from tests.support.postgres import postgres  # noqa: F401


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres").new_database()
    else:
        url = f"sqlite:///{tmp_path / 'm.db'}"
    database = Database(url, threads=4)
    migrate.upgrade(database.engine)
    yield database
    database.dispose()


def test_migrations_reach_head_and_match_the_models(db: Database) -> None:
    assert migrate.current(db.engine) == migrate.head()
    migrate.upgrade(db.engine)  # a second start changes nothing
    assert migrate.current(db.engine) == migrate.head()
    tables = set(inspect(db.engine).get_table_names())
    assert {"users", "tokens", "vfolders", "vfolder_shares", "datasets", "dataset_access",
            "kernels", "kernel_mounts", "agents"} <= tables
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"models and migrations disagree: {diff}"


def test_downgrade_and_upgrade_again(db: Database) -> None:
    with db.engine.begin() as conn:
        config = migrate.alembic_config()
        config.attributes["connection"] = conn
        from alembic import command
        command.downgrade(config, "base")
    assert "vfolders" not in inspect(db.engine).get_table_names()
    migrate.upgrade(db.engine)
    assert migrate.current(db.engine) == migrate.head()


def _vfolder(owner_id: int, alias: str, status: str = "ready") -> Vfolder:
    vfid = uuid.uuid4()
    return Vfolder(id=vfid, owner_id=owner_id, alias=alias, volume="v", path=vfid.hex,
                   status=status, status_message="")


def test_one_live_alias_per_owner(db: Database) -> None:
    """The partial unique index: two live vfolders of one alias never coexist."""
    user, _ = db.call(lambda s: create_user(s, "olive"))
    owner = db.call(lambda s: s.scalar(select(User.id).where(User.name == "olive")))
    first = _vfolder(owner, "data")
    db.call(lambda s: s.add(first))
    with pytest.raises(Conflict) as err:  # an unhandled unique violation: a lost race
        db.call(lambda s: s.add(_vfolder(owner, "data")))
    assert err.value.code == "conflict" and err.value.status == 409
    db.call(lambda s: s.execute(text("UPDATE vfolders SET status = :st WHERE alias = 'data'"),
                                {"st": DELETE_COMPLETE}))
    db.call(lambda s: s.add(_vfolder(owner, "data")))  # purged ones free the alias
    other, _ = db.call(lambda s: create_user(s, "rhea"))
    rhea = db.call(lambda s: s.scalar(select(User.id).where(User.name == "rhea")))
    db.call(lambda s: s.add(_vfolder(rhea, "data")))  # another owner may use it
    count = db.call(lambda s: len(s.scalars(select(Vfolder)).all()))
    assert count == 3


def test_tokens_are_stored_hashed(db: Database) -> None:
    _, token = db.call(lambda s: create_user(s, "olive", admin=True, uid=1234, gid=99))
    stored = db.call(lambda s: s.scalars(select(Token.token_hash)).all())
    assert token not in stored and auth.hash_token(token) in stored
    who = db.call(auth.lookup, token)
    assert (who.name, who.is_admin, who.uid, who.gid) == ("olive", True, 1234, 99)
    with pytest.raises(Unauthenticated):
        db.call(auth.lookup, token + "x")
    with pytest.raises(Unauthenticated):
        db.call(auth.lookup, auth.hash_token(token))  # the hash itself is no token


async def test_concurrent_writers_from_trio(db: Database) -> None:
    """Many transactions from worker threads at once: none fails with 'locked'."""
    await db.run(lambda s: create_user(s, "olive"))
    owner = await db.read(lambda s: s.scalar(select(User.id).where(User.name == "olive")))

    async def add(i: int) -> None:
        def work(session) -> None:
            session.scalars(select(Vfolder).where(Vfolder.owner_id == owner)).all()
            session.add(_vfolder(owner, f"a{i}"))
        await db.run(work)

    async with trio.open_nursery() as nursery:
        for i in range(40):
            nursery.start_soon(add, i)
    aliases = await db.read(lambda s: sorted(s.scalars(select(Vfolder.alias)).all()))
    assert aliases == sorted(f"a{i}" for i in range(40))
