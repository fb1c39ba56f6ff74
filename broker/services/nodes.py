"""Nodes and their API tokens."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from m2kt.broker.caller import Caller
from m2kt.broker.errors import Conflict, Malformed, NotFound, Unauthorized
from m2kt.broker.models import ApiToken, Node, Role
from m2kt.broker.schemas import NAME_PATTERN, TokenOut
from m2kt.broker.security import DEFAULT_SCOPES, hash_token, new_token, valid_scope
from m2kt.broker.services import audit


def get_node(session: Session, name: str) -> Node:
    node = session.scalar(select(Node).where(Node.name == name)) if re.fullmatch(NAME_PATTERN, name) else None
    if node is None:
        raise NotFound(f"no node {name!r}", code="node_not_found")
    return node


def issue_token(
    session: Session, node: Node, scopes: list[str] | None, ttl_days: int | None, *, secret: str | None = None
) -> TokenOut:
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
        prefix=secret[:12],
        scopes=scopes,
        created_at=now,
        expires_at=now + timedelta(days=ttl_days) if ttl_days else None,
    )
    session.add(row)
    session.flush()
    return TokenOut(
        id=row.id,
        node=node.name,
        prefix=row.prefix,
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

    The new token lives no longer than the old one was issued for (or ``default_ttl_days`` if it had
    no expiry), so rotation cannot stretch a lifetime an admin chose."""
    # Two rotations with one token at once: the row lock makes the second see the first's revocation.
    old = session.scalar(select(ApiToken).where(ApiToken.id == caller.token_id).with_for_update(of=ApiToken))
    if old is None or old.revoked_at is not None:
        raise Unauthorized("this API token was revoked", code="token_revoked", headers={"WWW-Authenticate": "Bearer"})
    limit = (old.expires_at - old.created_at) if old.expires_at is not None else timedelta(days=default_ttl_days)
    longest = max(1, int(limit.total_seconds() // 86400))
    if ttl_days is not None and ttl_days > longest:
        raise Malformed(
            f"ttl_days {ttl_days} is longer than this token's own lifetime ({longest} days); ask an admin for more",
            code="ttl_too_long",
        )
    token = issue_token(session, old.node, list(old.scopes), ttl_days or longest)
    old.revoked_at = datetime.now(UTC)
    audit.record(session, caller.node_id, "token.rotated", caller.node, old_token_id=old.id, token_id=token.id)
    return token


def token_out(row: ApiToken) -> TokenOut:
    return TokenOut(
        id=row.id,
        node=row.node.name,
        prefix=row.prefix,
        scopes=row.scopes,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
    )


def ensure_admin(session: Session, token: str, name: str = "admin") -> bool:
    """Create the first admin with this token unless an admin exists. True when created."""
    if session.scalar(select(Node).where(Node.role == Role.admin)) is not None:
        return False
    create_node(session, None, name, Role.admin, None, None, secret=token)
    return True
