"""Turning rows into API records."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.models import LineageEdge, Packet, PublicKey, TopicEvent
from broker.schemas import EventOut, KeyOut, PacketOut, SafetyVerdict


def packet_out(session: Session, packet: Packet) -> PacketOut:
    parents = session.scalars(select(LineageEdge.parent_id).where(LineageEdge.child_id == packet.id)).all()
    return PacketOut(
        id=packet.id,
        topic=packet.topic.name,
        publisher=packet.publisher.name,
        key_fingerprint=packet.key_fingerprint,
        size=packet.size,
        data_sha256=packet.data_sha256,
        status=packet.status,
        safety=SafetyVerdict.model_validate(packet.safety),
        parents=sorted(parents),
        created_at=packet.created_at,
        manifest=packet.manifest,
    )


def event_out(session: Session, event: TopicEvent) -> EventOut:
    return EventOut(seq=event.seq, kind=event.kind, at=event.created_at, packet=packet_out(session, event.packet))


def key_out(key: PublicKey) -> KeyOut:
    return KeyOut(
        fingerprint=key.fingerprint,
        owner=key.owner.name,
        public_key=key.public_key,
        created_at=key.created_at,
        revoked_at=key.revoked_at,
        revoked_reason=key.revoked_reason,
    )
