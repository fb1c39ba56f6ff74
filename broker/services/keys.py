"""The key registry: nodes register Ed25519 public keys; revoking one revokes its packets."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from m2kt.broker.caller import Caller
from m2kt.broker.errors import Conflict, Forbidden, Malformed, NotFound
from m2kt.broker.models import EventKind, Node, Packet, PacketStatus, PublicKey
from m2kt.broker.services import audit
from m2kt.broker.services.topics import append_event
from m2kt.errors import KeyFileError
from m2kt.format.keys import parse_verify_key
from m2kt.format.manifest import SHA256_PATTERN


def get_key(session: Session, fingerprint: str) -> PublicKey:
    # Not a sha256: no such key (and no query with text the database would refuse, e.g. NUL).
    key = session.get(PublicKey, fingerprint) if re.fullmatch(SHA256_PATTERN, fingerprint) else None
    if key is None:
        raise NotFound(f"no key with fingerprint {fingerprint[:64]!r}", code="key_not_found")
    return key


def register_key(session: Session, caller: Caller, text: str, owner: str | None) -> tuple[PublicKey, bool]:
    """The caller's 'keys' scope is checked by the route (KeysCaller)."""
    try:
        verify_key = parse_verify_key(text)
    except (KeyFileError, ValueError) as exc:
        raise Malformed(
            f"not an Ed25519 public key: {getattr(exc, 'reason', exc)}", code="invalid_public_key"
        ) from None
    owner_id = caller.node_id
    if owner is not None and owner != caller.node:
        if not caller.is_admin:
            raise Forbidden("only admins register keys for another node", code="insufficient_scope")
        node = session.scalar(select(Node).where(Node.name == owner))
        if node is None:
            raise NotFound(f"no node {owner!r}", code="node_not_found")
        owner_id = node.id
    existing = session.get(PublicKey, verify_key.fingerprint)
    if existing is not None:
        if existing.owner_id != owner_id:
            raise Conflict("this key is registered to another node", code="key_taken")
        return existing, False
    key = PublicKey(fingerprint=verify_key.fingerprint, owner_id=owner_id, public_key=verify_key.to_base64())
    session.add(key)
    audit.record(session, caller.node_id, "key.registered", key.fingerprint, owner_id=owner_id)
    session.flush()
    session.refresh(key)
    return key, True


def revoke_key(session: Session, caller: Caller, fingerprint: str, reason: str | None) -> tuple[PublicKey, int]:
    """Revoke a key (admin or owner; the 'keys' scope is the route's): its packets become revoked and
    subscribers get an event each."""
    key = get_key(session, fingerprint)
    if key.owner_id != caller.node_id and not caller.is_admin:
        raise Forbidden("only the key's owner or an admin can revoke it", code="insufficient_scope")
    if key.revoked_at is not None:
        return key, 0
    key.revoked_at = datetime.now(UTC)
    key.revoked_reason = reason
    packets = list(
        session.scalars(
            select(Packet)
            .where(Packet.key_fingerprint == fingerprint, Packet.status != PacketStatus.revoked)
            .order_by(Packet.created_at)
        )
    )
    for packet in packets:
        was_visible = packet.status is PacketStatus.accepted
        packet.status = PacketStatus.revoked
        if was_visible:
            append_event(session, packet.topic, EventKind.revoked, packet.id)
    audit.record(session, caller.node_id, "key.revoked", fingerprint, reason=reason, packets=len(packets))
    return key, len(packets)
