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
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, Integer, Text, bindparam, cast, select
from sqlalchemy.orm import Session, sessionmaker

from m2kt.broker.caller import Caller
from m2kt.broker.db import is_postgres
from m2kt.broker.models import ApiToken, EventKind, LineageEdge, Node, Packet, PacketStatus, Topic, TopicEvent
from m2kt.broker.services.auth import TOKEN_BY_ID_SQL, refuse_unusable, token_state
from m2kt.broker.services.pipelined import compiled, read_pipeline, stored_member
from m2kt.broker.services.records import parents_of
from m2kt.broker.services.topics import get_topic, no_such_topic
from m2kt.format.manifest import TOPIC_PATTERN

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


_COLUMNS = (
    TopicEvent.seq,
    TopicEvent.kind,
    TopicEvent.created_at,
    Packet.id,
    Topic.name.label("topic_name"),
    Node.name.label("publisher"),
    Packet.key_fingerprint,
    Packet.size,
    Packet.data_sha256,
    Packet.status,
    cast(Packet.safety, Text).label("safety"),
    Packet.created_at.label("packet_created_at"),
    cast(Packet.manifest, Text).label("manifest"),
)


def _page_query(topic_id: Any, after: Any, limit: Any) -> Any:
    return (
        select(*_COLUMNS)
        .join(Packet, Packet.id == TopicEvent.packet_id)
        .join(Topic, Topic.id == Packet.topic_id)
        .join(Node, Node.id == Packet.publisher_id)
        .where(TopicEvent.topic_id == topic_id, TopicEvent.seq > after)
        .order_by(TopicEvent.seq)
        .limit(limit)
    )


_TOPIC_ID = select(Topic.id).where(Topic.name == bindparam("topic")).scalar_subquery()
_AFTER, _LIMIT = bindparam("after", type_=BigInteger), bindparam("limit", type_=Integer)
_PG_TOPIC = compiled(select(Topic.id).where(Topic.name == bindparam("topic")))
_PG_PAGE = compiled(_page_query(_TOPIC_ID, _AFTER, _LIMIT))
_PG_PARENTS = compiled(  # the parents of the very page above, in the same round trip
    select(LineageEdge.child_id, LineageEdge.parent_id).where(
        LineageEdge.child_id.in_(
            select(TopicEvent.packet_id)
            .where(TopicEvent.topic_id == _TOPIC_ID, TopicEvent.seq > _AFTER)
            .order_by(TopicEvent.seq)
            .limit(_LIMIT)
        )
    )
)


def raw_event_page(
    sessions: sessionmaker[Session], topic: str, after: int, limit: int, caller: Caller | None = None
) -> RawPage:
    """Events of ``topic`` with seq > ``after``, at most ``limit``, as JSON bytes (404 for no such topic).

    With ``caller``, its token and node are checked again with the page (401 when revoked, expired or
    disabled since it authenticated). ``sessions``: autocommit read sessions; on Postgres the topic, the page,
    its parents and the credential check are one round trip."""
    if is_postgres(sessions):
        rows, parents = _page_postgres(sessions, topic, after, limit, caller)
    else:
        with sessions() as session:
            topic_row = get_topic(session, topic)
            rows = session.execute(_page_query(topic_row.id, after, limit)).all()
            parents = parents_of(session, {row[3] for row in rows})
            if caller is not None:
                refuse_unusable(token_state(session, ApiToken.id == caller.token_id), datetime.now(UTC))
    items = []
    for row in rows:
        seq, kind, at, pid, topic_name, publisher, fingerprint, size, data_sha, status, safety, created, manifest = row
        kind, status = stored_member(EventKind, kind), stored_member(PacketStatus, status)
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


def _page_postgres(
    reads: sessionmaker[Session], topic: str, after: int, limit: int, caller: Caller | None
) -> tuple[list[Any], dict[str, list[str]]]:
    if not re.fullmatch(TOPIC_PATTERN, topic):  # not a topic name: no query with text Postgres would refuse
        raise no_such_topic(topic)
    params = {"topic": topic, "after": after, "limit": limit}
    statements = [(_PG_TOPIC, {"topic": topic}), (_PG_PAGE, params), (_PG_PARENTS, params)]
    if caller is not None:
        statements.append((TOKEN_BY_ID_SQL, {"token_id": caller.token_id}))
    found, rows, edges, *token = read_pipeline(reads, statements)
    if not found:
        raise no_such_topic(topic)
    if caller is not None:
        refuse_unusable(token[0][0] if token[0] else None, datetime.now(UTC))
    parents: dict[str, list[str]] = {row.id: [] for row in rows}
    for edge in edges:
        parents[edge.child_id].append(edge.parent_id)
    return rows, {pid: sorted(ps) for pid, ps in parents.items()}
