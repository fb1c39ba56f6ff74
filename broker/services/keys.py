"""The key registry: nodes register Ed25519 public keys; revoking one revokes its packets; a key that
signed nothing yet (e.g. registered under the wrong node) can be dropped and registered again."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

from sqlalchemy import exists, func, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from m2kt.broker.caller import Caller
from m2kt.broker.errors import Conflict, Forbidden, Malformed, NotFound
from m2kt.broker.models import EventKind, Node, Packet, PacketStatus, PublicKey
from m2kt.broker.schemas import KeyRegister
from m2kt.broker.services import audit
from m2kt.broker.services.topics import append_event
from m2kt.broker.services.upsert import insert_or_find
from m2kt.broker.settings import Settings
from m2kt.errors import KeyFileError
from m2kt.format.key_proof import proof_problem
from m2kt.format.keys import VerifyKey, parse_verify_key
from m2kt.format.manifest import SHA256_PATTERN


def get_key(session: Session, fingerprint: str) -> PublicKey:
    # Not a sha256: no such key (and no query with text the database would refuse, e.g. NUL).
    key = session.get(PublicKey, fingerprint) if re.fullmatch(SHA256_PATTERN, fingerprint) else None
    if key is None:
        raise NotFound(f"no key with fingerprint {fingerprint[:64]!r}", code="key_not_found")
    return key


def list_keys(session: Session, owner: str | None, after: str | None, limit: int) -> list[PublicKey]:
    """A page of the registry, oldest first; ``after``: the last fingerprint of the previous page."""
    query = select(PublicKey).order_by(PublicKey.created_at, PublicKey.fingerprint).limit(limit)
    if owner is not None:
        query = query.join(Node, Node.id == PublicKey.owner_id).where(Node.name == owner)
    if after is not None:
        last = get_key(session, after)
        query = query.where(tuple_(PublicKey.created_at, PublicKey.fingerprint) > (last.created_at, last.fingerprint))
    return list(session.scalars(query))


def register_key(session: Session, caller: Caller, body: KeyRegister, settings: Settings) -> tuple[PublicKey, bool]:
    """The caller's 'keys' scope is checked by the route (KeysCaller). The body proves possession of the
    private key (a signature over the registration for the owner node, :mod:`m2kt.format.key_proof`);
    a node holds at most ``max_keys_per_node`` unrevoked keys (409 ``too_many_keys``)."""
    owner, max_keys = body.owner, settings.max_keys_per_node
    try:
        verify_key = parse_verify_key(body.public_key)
    except (KeyFileError, ValueError) as exc:
        raise Malformed(
            f"not an Ed25519 public key: {getattr(exc, 'reason', exc)}", code="invalid_public_key"
        ) from None
    if owner is None and caller.is_admin:
        # An admin registering a node's key while logged in as itself would make the admin its owner,
        # and the node's uploads would then be refused (key_not_owned): make the admin say whose it is.
        raise Malformed(
            "as admin, name the node this key belongs to: --owner NODE (or owner in the body); "
            f"--owner {caller.node} if it really is this admin node's own key",
            code="owner_required",
        )
    owner_id = caller.node_id
    if owner is not None and owner != caller.node:
        if not caller.is_admin:
            raise Forbidden("only admins register keys for another node", code="insufficient_scope")
        node = session.scalar(select(Node).where(Node.name == owner))
        if node is None:
            raise NotFound(f"no node {owner!r}", code="node_not_found")
        owner_id = node.id
    owner_name = owner if owner is not None else caller.node
    _check_proof(verify_key, owner_name, body, settings.key_proof_max_age_seconds)
    held = session.scalar(
        select(func.count())
        .select_from(PublicKey)
        .where(PublicKey.owner_id == owner_id, PublicKey.revoked_at.is_(None))
    )
    if held >= max_keys and session.get(PublicKey, verify_key.fingerprint) is None:
        raise Conflict(
            f"the node holds {held} unrevoked keys, the most this broker allows (M2KT_MAX_KEYS_PER_NODE); "
            "revoke or drop one first",
            code="too_many_keys",
        )
    key, created = insert_or_find(
        session,
        lambda: session.get(PublicKey, verify_key.fingerprint),
        lambda: PublicKey(fingerprint=verify_key.fingerprint, owner_id=owner_id, public_key=verify_key.to_base64()),
    )
    if not created:
        if key.owner_id != owner_id:
            raise Conflict(
                f"this key is registered to node {key.owner.name!r}; if that is wrong and the key signed no "
                f"packet, drop it first (m2kt key drop {key.fingerprint}) and register it again",
                code="key_taken",
            )
        return key, False
    audit.record(session, caller.node_id, "key.registered", key.fingerprint, owner_id=owner_id)
    session.refresh(key)
    return key, True


def _check_proof(key: VerifyKey, node: str, body: KeyRegister, max_age: float) -> None:
    if body.proof is None or body.signed_at is None:
        raise Malformed(
            "registering a key needs proof that you hold its private key: give the private key to "
            "`m2kt key register` or the SDK's register_key (it signs, and only the signature is sent), or, "
            "as admin, the node's `m2kt key prove` file",
            code="proof_required",
        )
    problem = proof_problem(key, node, body.signed_at, body.proof, now=time.time(), max_age=max_age)
    if problem is not None:
        raise Malformed(f"{problem} (the key was not registered)", code="invalid_proof")


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
    # Write the revocation first: the UPDATE waits for an upload committing a packet under this key (it
    # holds the key's row lock, see upload._recheck_publisher), so the query below sees that packet too.
    session.flush()
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
            append_event(session, packet.topic_id, packet.topic.name, EventKind.revoked, packet.id)
    audit.record(session, caller.node_id, "key.revoked", fingerprint, reason=reason, packets=len(packets))
    return key, len(packets)


def delete_key(session: Session, caller: Caller, fingerprint: str) -> None:
    """Drop a key that no packet references (admin or owner; the 'keys' scope is the route's), so it can be
    registered again, e.g. under the node it really belongs to. A key that signed a packet stays: its
    packets keep their provenance; revoke it instead."""
    key = get_key(session, fingerprint)
    if key.owner_id != caller.node_id and not caller.is_admin:
        raise Forbidden("only the key's owner or an admin can drop it", code="insufficient_scope")
    in_use = Conflict(
        f"key {fingerprint[:16]}… signed packets on this broker, which keep their provenance: it cannot be "
        "dropped; revoke it instead (m2kt key revoke, POST /v1/keys/{fingerprint}/revoke)",
        code="key_in_use",
    )
    # Lock the key's row: an upload's foreign-key check on it then waits for this transaction, and one
    # that got there first has committed its packet before the check below.
    session.execute(select(PublicKey.fingerprint).where(PublicKey.fingerprint == fingerprint).with_for_update())
    if session.scalar(select(exists().where(Packet.key_fingerprint == fingerprint))):
        raise in_use
    owner = key.owner.name
    try:
        with session.begin_nested():  # a packet committed since the check above: refused by its foreign key
            session.delete(key)
    except IntegrityError:
        raise in_use from None
    audit.record(session, caller.node_id, "key.deleted", fingerprint, owner=owner)
