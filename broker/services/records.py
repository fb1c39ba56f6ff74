"""Turning rows into API records."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from m2kt.broker.models import LineageEdge, Packet, PublicKey, TopicEvent
from m2kt.broker.schemas import EventOut, KeyOut, PacketOut, SafetyVerdict


def parents_of(session: Session, packet_ids: Collection[str]) -> dict[str, list[str]]:
    """Each packet's parents (sorted), in one query for all of them."""
    parents: dict[str, list[str]] = {pid: [] for pid in packet_ids}
    if parents:
        rows = session.execute(
            select(LineageEdge.child_id, LineageEdge.parent_id).where(LineageEdge.child_id.in_(list(parents)))
        )
        for child, parent in rows:
            parents[child].append(parent)
    return {pid: sorted(ps) for pid, ps in parents.items()}


def packet_out(session: Session, packet: Packet, parents: list[str] | None = None) -> PacketOut:
    """The API record; ``parents`` when the caller already has them (else one query)."""
    if parents is None:
        parents = parents_of(session, [packet.id])[packet.id]
    return PacketOut(
        id=packet.id,
        topic=packet.topic.name,
        publisher=packet.publisher.name,
        key_fingerprint=packet.key_fingerprint,
        size=packet.size,
        data_sha256=packet.data_sha256,
        status=packet.status,
        safety=SafetyVerdict.model_validate(packet.safety),
        parents=parents,
        created_at=packet.created_at,
        manifest=packet.manifest,
    )


def events_out(session: Session, events: Sequence[TopicEvent]) -> list[EventOut]:
    """API records for a page of events: one lineage query for the page, not one per event."""
    parents = parents_of(session, {e.packet_id for e in events})
    return [
        EventOut(seq=e.seq, kind=e.kind, at=e.created_at, packet=packet_out(session, e.packet, parents[e.packet_id]))
        for e in events
    ]


def key_out(key: PublicKey) -> KeyOut:
    return KeyOut(
        fingerprint=key.fingerprint,
        owner=key.owner.name,
        public_key=key.public_key,
        created_at=key.created_at,
        revoked_at=key.revoked_at,
        revoked_reason=key.revoked_reason,
    )
