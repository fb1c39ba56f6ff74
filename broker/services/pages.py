"""Event pages as JSON bytes, without decoding a single manifest.

A page of events is most of what subscribers read, and each event carries its packet's record, manifest
included. Decoding every manifest from the database into Python objects, validating them into the
response model and encoding them again costs far more than the query. Here one Core query fetches the
page with the manifest and the safety verdict *as JSON text* (``CAST(… AS TEXT)``: Postgres prints its
JSONB, SQLite returns what it stored), a second one the page's parents, and each item is written with
that text spliced in as it is. The bytes are the same document as ``EventPage`` (:mod:`m2kt.broker.schemas`)
— a test holds the two equal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Text, cast, select
from sqlalchemy.orm import Session, sessionmaker

from m2kt.broker.models import Node, Packet, Topic, TopicEvent
from m2kt.broker.services.records import parents_of
from m2kt.broker.services.topics import get_topic

__all__ = ["RawEvent", "RawPage", "raw_event_page"]


@dataclass(frozen=True)
class RawEvent:
    seq: int
    kind: str
    json: bytes  # the whole EventOut document


@dataclass(frozen=True)
class RawPage:
    items: list[RawEvent]
    cursor: int

    def json(self) -> bytes:
        """The ``EventPage`` document."""
        return b'{"items":[' + b",".join(e.json for e in self.items) + b'],"cursor":' + str(self.cursor).encode() + b"}"


def _when(value: datetime) -> str:
    """As pydantic writes an aware UTC datetime: ISO 8601 with a ``Z``."""
    value = value.astimezone(UTC) if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return value.isoformat().replace("+00:00", "Z")


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def raw_event_page(sessions: sessionmaker[Session], topic: str, after: int, limit: int) -> RawPage:
    """Events of ``topic`` with seq > ``after``, at most ``limit``, as JSON bytes (404 for no such topic)."""
    with sessions() as session:
        topic_row = get_topic(session, topic)
        rows = session.execute(
            select(
                TopicEvent.seq,
                TopicEvent.kind,
                TopicEvent.created_at,
                Packet.id,
                Topic.name,
                Node.name,
                Packet.key_fingerprint,
                Packet.size,
                Packet.data_sha256,
                Packet.status,
                cast(Packet.safety, Text),
                Packet.created_at,
                cast(Packet.manifest, Text),
            )
            .join(Packet, Packet.id == TopicEvent.packet_id)
            .join(Topic, Topic.id == Packet.topic_id)
            .join(Node, Node.id == Packet.publisher_id)
            .where(TopicEvent.topic_id == topic_row.id, TopicEvent.seq > after)
            .order_by(TopicEvent.seq)
            .limit(limit)
        ).all()
        parents = parents_of(session, {row[3] for row in rows})
    items = []
    for row in rows:
        seq, kind, at, pid, topic_name, publisher, fingerprint, size, data_sha, status, safety, created, manifest = row
        head = _dumps({"seq": seq, "kind": kind.value, "at": _when(at)})[:-1]
        packet = _dumps(
            {
                "id": pid,
                "topic": topic_name,
                "publisher": publisher,
                "key_fingerprint": fingerprint,
                "size": size,
                "data_sha256": data_sha,
                "status": status.value,
            }
        )[:-1]
        tail = _dumps({"parents": parents[pid], "created_at": _when(created)})[1:-1]
        document = f'{head},"packet":{packet},"safety":{safety},{tail},"manifest":{manifest}}}}}'
        items.append(RawEvent(seq, kind.value, document.encode()))
    return RawPage(items, items[-1].seq if items else after)
