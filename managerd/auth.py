"""Bearer tokens: issued once in clear, stored only as their SHA-256.

Tokens carry 256 random bits, so a plain SHA-256 (no salt, no slow hash) is
enough to make a stolen database useless for logging in, and it allows an
indexed lookup per request.  The clear token is shown exactly once, when
issued.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from managerd.db.models import Token, User
from managerd.errors import Unauthenticated

TOKEN_PREFIX = "azfs_"


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of a request."""

    id: int
    name: str
    is_admin: bool
    uid: int
    gid: int


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_token(session: Session, user_id: int, label: str = "") -> str:
    """Stores the hash of a fresh token for ``user_id``; returns the clear token."""
    token = new_token()
    session.add(Token(user_id=user_id, token_hash=hash_token(token), label=label[:64]))
    return token


def lookup(session: Session, token: str) -> Principal:
    digest = hash_token(token)
    row = session.execute(
        select(User, Token.token_hash).join(Token, Token.user_id == User.id)
        .where(Token.token_hash == digest)).first()
    if row is None or not hmac.compare_digest(row[1], digest):
        raise Unauthenticated("unknown or revoked token")
    user = row[0]
    return Principal(user.id, user.name, user.is_admin, user.uid, user.gid)
