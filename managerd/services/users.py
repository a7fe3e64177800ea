"""Users and their API tokens (admin operations, plus "who am I" and own tokens)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from managerd.auth import Principal, issue_token
from managerd.db.models import Token, User, iso
from managerd.db.session import Database
from managerd.errors import Conflict, Forbidden, InvalidArgument, NotFound
from managerd.services.names import validate_name

MAX_ID = 2**32 - 2


def user_dict(user: User) -> dict[str, Any]:
    return {"name": user.name, "admin": user.is_admin, "uid": user.uid, "gid": user.gid,
            "created_at": iso(user.created_at)}


def _check_ids(uid: int | None, gid: int | None) -> None:
    for value in (uid, gid):
        if value is not None and not 0 <= value <= MAX_ID:
            raise InvalidArgument(f"uid/gid must be 0-{MAX_ID}")


def create_user(session: Session, name: str, *, admin: bool = False, uid: int = 1000,
                gid: int = 1000, token_label: str = "initial") -> tuple[dict, str]:
    """Creates a user and its first token; returns (user, clear token)."""
    validate_name(name, "user name")
    _check_ids(uid, gid)
    user = User(name=name, is_admin=admin, uid=uid, gid=gid)
    session.add(user)
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(f"a user named {name!r} exists", code="user-exists") from None
    return user_dict(user), issue_token(session, user.id, token_label)


def get_user(session: Session, name: str) -> User:
    user = session.scalars(select(User).where(User.name == name)).first()
    if user is None:
        raise NotFound(f"no user named {name!r}", code="user-not-found")
    return user


def count_users(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(User)) or 0


class UserService:
    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    def _admin(who: Principal) -> None:
        if not who.is_admin:
            raise Forbidden("only admins manage users")

    async def create(self, who: Principal, name: str, admin: bool, uid: int,
                     gid: int) -> dict[str, Any]:
        self._admin(who)
        user, token = await self.db.run(
            lambda s: create_user(s, name, admin=admin, uid=uid, gid=gid))
        return {**user, "token": token}

    async def list(self, who: Principal) -> list[dict[str, Any]]:
        self._admin(who)
        return await self.db.read(
            lambda s: [user_dict(u) for u in s.scalars(select(User).order_by(User.name))])

    async def get(self, who: Principal, name: str) -> dict[str, Any]:
        if not who.is_admin and name != who.name:
            raise Forbidden("only admins see other users")
        return await self.db.read(lambda s: user_dict(get_user(s, name)))

    async def update(self, who: Principal, name: str, *, admin: bool | None,
                     uid: int | None, gid: int | None) -> dict[str, Any]:
        self._admin(who)
        _check_ids(uid, gid)

        def work(session: Session) -> dict[str, Any]:
            user = get_user(session, name)
            if admin is not None:
                if not admin and user.id == who.id:
                    raise InvalidArgument("admins cannot remove their own admin flag")
                user.is_admin = admin
            if uid is not None:
                user.uid = uid
            if gid is not None:
                user.gid = gid
            return user_dict(user)

        return await self.db.run(work)

    async def issue_token(self, who: Principal, name: str, label: str) -> dict[str, Any]:
        if not who.is_admin and name != who.name:
            raise Forbidden("only admins issue tokens for other users")

        def work(session: Session) -> dict[str, Any]:
            user = get_user(session, name)
            return {"user": user.name, "label": label,
                    "token": issue_token(session, user.id, label)}

        return await self.db.run(work)

    async def revoke_tokens(self, who: Principal, name: str) -> int:
        """Revokes every token of ``name``; returns how many were revoked."""
        if not who.is_admin and name != who.name:
            raise Forbidden("only admins revoke tokens of other users")

        def work(session: Session) -> int:
            user = get_user(session, name)
            return session.execute(delete(Token).where(Token.user_id == user.id)).rowcount

        return await self.db.run(work)
