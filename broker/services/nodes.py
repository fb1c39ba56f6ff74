"""Nodes and their API tokens."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from m2kt.broker.caller import Caller
from m2kt.broker.errors import Conflict, Malformed, NotFound, Unauthorized
from m2kt.broker.models import ApiToken, Node, Role
from m2kt.broker.schemas import NAME_PATTERN, TokenOut
from m2kt.broker.security import DEFAULT_SCOPES, hash_token, new_token, valid_scope
from m2kt.broker.services import audit

#: Characters of a token shown in listings to tell tokens apart: "m2kt_" and 4 of the secret (24 of its
#: 256 bits; tokens issued before kept 7 in the database, and listings cut them to 4 as well).
SHOWN = 9


def get_node(session: Session, name: str) -> Node:
    node = session.scalar(select(Node).where(Node.name == name)) if re.fullmatch(NAME_PATTERN, name) else None
    if node is None:
        raise NotFound(f"no node {name!r}", code="node_not_found")
    return node


def issue_token(
    session: Session,
    node: Node,
    scopes: list[str] | None,
    ttl_days: int | None,
    *,
    secret: str | None = None,
    expires_at: datetime | None = None,
) -> TokenOut:
    """A new token for ``node``; it expires after ``ttl_days`` (or at ``expires_at``; neither: never)."""
    scopes = list(scopes) if scopes is not None else list(DEFAULT_SCOPES[node.role])
    bad = [s for s in scopes if not valid_scope(s)]
    if bad:
        raise Malformed(
            f"unknown scopes {bad}: use admin, read, receipt, keys or publish:<topic-pattern>", code="invalid_scope"
        )
    secret = secret or new_token()
    now = datetime.now(UTC)
    row = ApiToken(
        node_id=node.id,
        token_hash=hash_token(secret),
        prefix=secret[:SHOWN],
        scopes=scopes,
        created_at=now,
        expires_at=expires_at or (now + timedelta(days=ttl_days) if ttl_days else None),
    )
    session.add(row)
    session.flush()
    return TokenOut(
        id=row.id,
        node=node.name,
        prefix=row.prefix[:SHOWN],
        scopes=scopes,
        created_at=now,
        expires_at=row.expires_at,
        token=secret,
    )


def create_node(
    session: Session,
    caller: Caller | None,
    name: str,
    role: Role,
    scopes: list[str] | None,
    ttl_days: int | None,
    *,
    secret: str | None = None,
) -> tuple[Node, TokenOut]:
    node = Node(name=name, role=role)
    try:
        with session.begin_nested():
            session.add(node)
    except IntegrityError:
        raise Conflict(f"a node named {name!r} exists already", code="node_exists") from None
    token = issue_token(session, node, scopes, ttl_days, secret=secret)
    audit.record(
        session, caller.node_id if caller else None, "node.created", name, role=role.value, scopes=token.scopes
    )
    return node, token


def set_disabled(session: Session, caller: Caller, name: str, *, disabled: bool) -> Node:
    """Disable (every token refused at once) or enable a node; an admin cannot disable itself."""
    node = get_node(session, name)
    if disabled and node.id == caller.node_id:
        raise Conflict("an admin cannot disable its own node", code="cannot_disable_self")
    if disabled != (node.disabled_at is not None):
        node.disabled_at = datetime.now(UTC) if disabled else None
        audit.record(session, caller.node_id, "node.disabled" if disabled else "node.enabled", name)
    return node


def revoke_token(session: Session, caller: Caller, token_id: int) -> ApiToken:
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFound(f"no token {token_id}", code="token_not_found")
    if row.revoked_at is None:
        row.revoked_at = datetime.now(UTC)
        audit.record(session, caller.node_id, "token.revoked", str(token_id), node=row.node.name)
    return row


def rotate_token(session: Session, caller: Caller, ttl_days: int | None, default_ttl_days: int) -> TokenOut:
    """A new token for the caller's node with the caller's scopes; the caller's token is revoked.

    Rotation changes the secret, not the lifetime: the new token expires when the old one would have
    (a token without expiry gets ``default_ttl_days``), or sooner with ``ttl_days``. So a 1-day token
    that keeps rotating still ends after its day."""
    # One rotation per token, on every database: the conditional UPDATE is the first statement of the
    # transaction, so it takes the write lock (SQLite) or the row lock (Postgres) and re-reads the row;
    # a concurrent second rotation finds it revoked and updates nothing.
    now = datetime.now(UTC)
    won = session.execute(
        update(ApiToken)
        .where(ApiToken.id == caller.token_id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=now)
        .execution_options(synchronize_session=False)
    ).rowcount
    if won != 1:
        raise Unauthorized("this API token was revoked", code="token_revoked", headers={"WWW-Authenticate": "Bearer"})
    old = session.get(ApiToken, caller.token_id, populate_existing=True)
    assert old is not None
    expires = old.expires_at if old.expires_at is not None else now + timedelta(days=default_ttl_days)
    if ttl_days is not None:
        if now + timedelta(days=ttl_days) > expires:
            left = max(0.0, (expires - now).total_seconds() / 86400)
            raise Malformed(
                f"ttl_days {ttl_days} would outlive this token ({left:.1f} days left); rotation keeps the expiry, "
                "ask an admin for a longer-lived token",
                code="ttl_too_long",
            )
        expires = now + timedelta(days=ttl_days)
    token = issue_token(session, old.node, list(old.scopes), None, expires_at=expires)
    audit.record(session, caller.node_id, "token.rotated", caller.node, old_token_id=old.id, token_id=token.id)
    return token


def token_out(row: ApiToken) -> TokenOut:
    return TokenOut(
        id=row.id,
        node=row.node.name,
        prefix=row.prefix[:SHOWN],
        scopes=row.scopes,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
    )


def ensure_admin(session: Session, token: str, name: str = "admin") -> bool:
    """Create the first admin with this token unless an admin exists. True when created."""
    if session.scalar(select(Node).where(Node.role == Role.admin)) is not None:
        return False
    try:
        create_node(session, None, name, Role.admin, None, None, secret=token)
    except Conflict:
        # replicas or workers starting together: the one that lost the insert finds the winner's admin
        if session.scalar(select(Node).where(Node.role == Role.admin)) is not None:
            return False
        raise
    return True
