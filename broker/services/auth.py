"""Resolving a bearer token to its caller: unknown, expired, revoked and disabled are refused (401)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Row, Select, bindparam, select, update
from sqlalchemy.orm import Session, sessionmaker

from m2kt.broker.caller import Caller
from m2kt.broker.db import is_postgres
from m2kt.broker.errors import Unauthorized
from m2kt.broker.models import ApiToken, Node, Role
from m2kt.broker.security import hash_token
from m2kt.broker.services.pipelined import compiled, read_cursor, stored_member

__all__ = ["TOKEN_BY_ID_SQL", "authenticate", "missing_token", "refuse_unusable", "token_state", "token_state_query"]

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def missing_token() -> Unauthorized:
    """The refusal of a request without a bearer token (here and in the request guard)."""
    return Unauthorized("send an API token: Authorization: Bearer m2kt_…", code="missing_token", headers=_CHALLENGE)


def token_state_query(where: ColumnElement[bool]) -> Select[Any]:
    """The token (and its node's) columns a refusal and a :class:`Caller` need, as one Core query."""
    return (
        select(
            ApiToken.id,
            ApiToken.node_id,
            ApiToken.scopes,
            ApiToken.expires_at,
            ApiToken.revoked_at,
            ApiToken.last_used_at,
            Node.name,
            Node.role,
            Node.disabled_at,
        )
        .join(Node, Node.id == ApiToken.node_id)
        .where(where)
    )


_BY_HASH = compiled(token_state_query(ApiToken.token_hash == bindparam("token_hash")))
TOKEN_BY_ID_SQL = compiled(token_state_query(ApiToken.id == bindparam("token_id")))  # the re-checks, on the driver


def token_state(session: Session, where: ColumnElement[bool]) -> Row[Any] | None:
    """:func:`token_state_query`'s row — no ORM objects on the path every request takes."""
    return session.execute(token_state_query(where)).first()


def authenticate(sessions: sessionmaker[Session], token: str | None) -> Caller:
    """Resolve a bearer token to its node; refuses unknown, expired, revoked or disabled.

    ``sessions``: autocommit read sessions (every request comes here: on Postgres the lookup is one driver
    round trip, :func:`read_cursor`); the last-use time is written at most once a minute."""
    if not token:
        raise missing_token()
    now = datetime.now(UTC)
    token_hash = hash_token(token)
    if is_postgres(sessions):
        with read_cursor(sessions) as cursor:
            row: Any = cursor.execute(_BY_HASH, {"token_hash": token_hash}).fetchone()
    else:
        with sessions() as session:
            row = token_state(session, ApiToken.token_hash == token_hash)
    refuse_unusable(row, now)
    assert row is not None
    if row.last_used_at is None or now - row.last_used_at > timedelta(minutes=1):
        with sessions.begin() as session:
            session.execute(update(ApiToken).where(ApiToken.id == row.id).values(last_used_at=now))
    expires = row.expires_at.astimezone(UTC) if row.expires_at is not None else None
    return Caller(row.node_id, row.name, stored_member(Role, row.role), tuple(row.scopes), row.id, expires)


def refuse_unusable(row: Row[Any] | None, now: datetime) -> None:
    """401 for a token that is unknown, revoked or expired at ``now``, or whose node is disabled
    (``row`` from :func:`token_state`)."""
    if row is None:
        raise Unauthorized("unknown API token", code="invalid_token", headers=_CHALLENGE)
    if row.revoked_at is not None:
        raise Unauthorized("this API token was revoked", code="token_revoked", headers=_CHALLENGE)
    if row.expires_at is not None and row.expires_at <= now:
        raise Unauthorized(
            "this API token has expired; ask an admin to rotate it", code="token_expired", headers=_CHALLENGE
        )
    if row.disabled_at is not None:
        raise Unauthorized("this node is disabled", code="node_disabled", headers=_CHALLENGE)
