"""Topics and their ordered event logs."""

from __future__ import annotations

import re

from sqlalchemy import func, insert, select, text, update
from sqlalchemy.orm import Session

from m2kt.broker.caller import Caller
from m2kt.broker.errors import Conflict, Malformed, NotFound
from m2kt.broker.models import EventKind, Packet, Topic, TopicEvent, utcnow
from m2kt.broker.pubsub import CHANNEL, wake_after_commit
from m2kt.broker.schemas import TopicOut
from m2kt.broker.services.pipelined import compiled, driver_connection, driver_errors
from m2kt.broker.services.upsert import insert_or_find
from m2kt.format.manifest import TOPIC_PATTERN


def check_topic_name(name: str) -> None:
    if not re.fullmatch(TOPIC_PATTERN, name):
        raise Malformed(
            f"invalid topic name {name[:140]!r}: use 1-128 lowercase letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit",
            code="invalid_topic",
        )


def get_topic(session: Session, name: str) -> Topic:
    # Not a topic name: no such topic (and no query with text the database would refuse, e.g. NUL).
    topic = session.scalar(select(Topic).where(Topic.name == name)) if re.fullmatch(TOPIC_PATTERN, name) else None
    if topic is None:
        raise no_such_topic(name)
    return topic


def no_such_topic(name: str) -> NotFound:
    """The refusal of a topic name this broker does not hold (404 ``topic_not_found``)."""
    return NotFound(f"no topic {name[:140]!r}", code="topic_not_found")


def check_topic_quota(session: Session, caller: Caller, name: str, limit: int) -> None:
    """409 ``too_many_topics`` when ``name`` does not exist yet and the caller (not an admin) has created
    ``limit`` topics already: a node cannot fill the topic list by uploading or subscribing."""
    if caller.is_admin or session.scalar(select(Topic.id).where(Topic.name == name)) is not None:
        return
    created = session.scalar(select(func.count()).select_from(Topic).where(Topic.created_by == caller.node_id)) or 0
    if created >= limit:
        raise Conflict(
            f"node {caller.node!r} created {created} topics, the most this broker allows (M2KT_MAX_TOPICS_PER_NODE); "
            f"use an existing topic or ask an admin to create {name!r}",
            code="too_many_topics",
        )


def list_topics(session: Session, after: str | None, limit: int) -> list[Topic]:
    """A page of topics by name; ``after``: the last name of the previous page."""
    query = select(Topic).order_by(Topic.name).limit(limit)
    if after is not None:
        query = query.where(Topic.name > after)
    return list(session.scalars(query))


def get_or_create_topic(session: Session, name: str, creator_id: int | None) -> Topic:
    check_topic_name(name)
    topic, _ = insert_or_find(
        session,
        lambda: session.scalar(select(Topic).where(Topic.name == name)),
        lambda: Topic(name=name, created_by=creator_id, last_seq=0),
    )
    return topic


# On Postgres one statement bumps the topic's seq (locking its row), appends the event and queues the NOTIFY.
_APPEND_POSTGRES = text(
    """
    WITH bumped AS (
        UPDATE topics SET last_seq = last_seq + 1 WHERE id = :topic_id RETURNING last_seq
    ), appended AS (
        INSERT INTO topic_events (topic_id, seq, kind, packet_id, created_at)
        SELECT :topic_id, last_seq, :kind, :packet_id, :created_at FROM bumped
        RETURNING seq
    )
    SELECT seq, pg_notify(:channel, :topic_name) FROM appended
    """
)


_APPEND_PSYCOPG = compiled(_APPEND_POSTGRES)  # the same statement, as psycopg spells it


def append_event_and_commit(session: Session, topic_id: int, topic_name: str, kind: EventKind, packet_id: str) -> int:
    """:func:`append_event` as the transaction's last statement, and the COMMIT sent with it.

    On Postgres the two go in one round trip (a psycopg pipeline): the topic row the append locks is released
    by a COMMIT the server already holds. Sent one after the other, the COMMIT waited for this thread to be
    scheduled again — under load, with the GIL shared by every upload, milliseconds — and all uploads to the
    topic queued behind that wait. The session's own commit afterwards finds the transaction closed and sends
    nothing (its after-commit hooks, the local wake-up among them, still run)."""
    if session.get_bind().dialect.name != "postgresql":
        seq = append_event(session, topic_id, topic_name, kind, packet_id)
        session.flush()
        return seq
    params = {"topic_id": topic_id, "kind": kind.value, "packet_id": packet_id, "created_at": utcnow()}
    params |= {"channel": CHANNEL, "topic_name": topic_name}
    connection, raw = driver_connection(session)
    with driver_errors(connection, raw, _APPEND_PSYCOPG), raw.pipeline(), raw.cursor() as cursor:
        cursor.execute(_APPEND_PSYCOPG, params)
        raw.commit()
        row = cursor.fetchone()
    assert row is not None
    wake_after_commit(session, topic_name)
    return int(row[0])


def append_event(session: Session, topic_id: int, topic_name: str, kind: EventKind, packet_id: str) -> int:
    """Append to the topic's log. The topic row stays locked until commit, so seq order is commit order."""
    if session.get_bind().dialect.name == "postgresql":  # one round trip, the NOTIFY for other replicas in it
        params = {"topic_id": topic_id, "kind": kind.value, "packet_id": packet_id, "created_at": utcnow()}
        params |= {"channel": CHANNEL, "topic_name": topic_name}
        seq = int(session.execute(_APPEND_POSTGRES, params).scalar_one())
    else:  # SQLite: one process, no NOTIFY
        seq = session.execute(
            update(Topic).where(Topic.id == topic_id).values(last_seq=Topic.last_seq + 1).returning(Topic.last_seq)
        ).scalar_one()
        row = {"topic_id": topic_id, "seq": seq, "kind": kind, "packet_id": packet_id, "created_at": utcnow()}
        session.execute(insert(TopicEvent), [row])
    wake_after_commit(session, topic_name)
    return seq


def events_after(session: Session, topic: Topic, after: int, limit: int) -> list[TopicEvent]:
    return list(
        session.scalars(
            select(TopicEvent)
            .where(TopicEvent.topic_id == topic.id, TopicEvent.seq > after)
            .order_by(TopicEvent.seq)
            .limit(limit)
        )
    )


def topic_out(session: Session, topic: Topic, default_threshold: float) -> TopicOut:
    count = session.scalar(select(func.count()).select_from(Packet).where(Packet.topic_id == topic.id)) or 0
    return TopicOut(
        name=topic.name,
        safety_threshold=topic.safety_threshold,
        effective_safety_threshold=topic.safety_threshold if topic.safety_threshold is not None else default_threshold,
        last_seq=topic.last_seq,
        packets=count,
        created_at=topic.created_at,
    )
