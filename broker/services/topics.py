"""Topics and their ordered event logs."""

from __future__ import annotations

import re

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from m2kt.broker.errors import Malformed, NotFound
from m2kt.broker.models import EventKind, Packet, Topic, TopicEvent
from m2kt.broker.pubsub import notify_in_transaction
from m2kt.broker.schemas import TopicOut
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
        raise NotFound(f"no topic {name[:140]!r}", code="topic_not_found")
    return topic


def get_or_create_topic(session: Session, name: str, creator_id: int | None) -> Topic:
    check_topic_name(name)
    topic = session.scalar(select(Topic).where(Topic.name == name))
    if topic is not None:
        return topic
    try:
        with session.begin_nested():
            topic = Topic(name=name, created_by=creator_id, last_seq=0)
            session.add(topic)
    except IntegrityError:  # created concurrently
        topic = session.scalar(select(Topic).where(Topic.name == name))
        assert topic is not None
    return topic


def append_event(session: Session, topic: Topic, kind: EventKind, packet_id: str) -> int:
    """Append to the topic's log. The topic row stays locked until commit, so seq order is commit order."""
    seq = session.execute(
        update(Topic).where(Topic.id == topic.id).values(last_seq=Topic.last_seq + 1).returning(Topic.last_seq)
    ).scalar_one()
    session.add(TopicEvent(topic_id=topic.id, seq=seq, kind=kind, packet_id=packet_id))
    notify_in_transaction(session, topic.name)
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
