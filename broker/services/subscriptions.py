"""Reading a topic's log: after a cursor, long-polling, and named subscriptions with kept cursors."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from sqlalchemy import bindparam, case, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from m2kt.broker.caller import Caller
from m2kt.broker.errors import Conflict, Malformed, NotFound
from m2kt.broker.models import Subscription, Topic
from m2kt.broker.schemas import MAX_NAME_LENGTH, EventPage, SubscriptionOut, storable_name
from m2kt.broker.services.pages import RawPage, raw_event_page
from m2kt.broker.services.pipelined import compiled, read_cursor
from m2kt.broker.services.records import events_out
from m2kt.broker.services.topics import (
    check_topic_name,
    check_topic_quota,
    events_after,
    get_or_create_topic,
    get_topic,
)
from m2kt.broker.services.upsert import insert_or_find
from m2kt.broker.settings import Settings
from m2kt.broker.state import BrokerState
from m2kt.broker.threads import in_thread


def event_page(sessions: sessionmaker[Session], topic: str, after: int, limit: int) -> EventPage:
    """The page as response models (the routes send :func:`~m2kt.broker.services.pages.raw_event_page`'s
    bytes instead, the same document without decoding the manifests)."""
    with sessions() as session:
        row = get_topic(session, topic)
        events = events_after(session, row, after, limit)
        items = events_out(session, events)
    return EventPage(items=items, cursor=items[-1].seq if items else after)


def _read_page(
    reads: sessionmaker[Session], caller: Caller, topic: str, after: int, limit: int, deadline: float
) -> tuple[RawPage, bool]:
    """The page, and whether it is the answer (it has events, or the wait is over); the caller's credentials
    are checked again with it (one round trip on Postgres)."""
    page = raw_event_page(reads, topic, after, limit, caller)
    return page, bool(page.items) or deadline - time.monotonic() <= 0


async def wait_for_events(
    state: BrokerState, caller: Caller, topic: str, after: int, wait: float, limit: int
) -> RawPage:
    """Events after ``after``; when none, wait up to ``wait`` seconds for one (long-poll).

    ``caller``'s token and node are checked again before the page is returned (401 when revoked,
    expired or disabled meanwhile): what a long-lived request delivers obeys the credentials of now."""
    deadline = time.monotonic() + min(wait, state.settings.max_wait_seconds)
    while True:
        wake = state.hub.listen(topic)  # before querying: a commit in between still wakes us
        page, final = await in_thread(_read_page, state.reads, caller, topic, after, limit, deadline)
        if final:
            return page
        remaining = deadline - time.monotonic()
        try:
            await asyncio.wait_for(wake.wait(), min(remaining, state.settings.poll_fallback_seconds))
        except TimeoutError:
            pass


def subscription_out(sub: Subscription) -> SubscriptionOut:
    return SubscriptionOut(
        name=sub.name, topic=sub.topic.name, cursor=sub.cursor, created_at=sub.created_at, updated_at=sub.updated_at
    )


def get_subscription(session: Session, caller: Caller, name: str) -> Subscription:
    sub = _find(session, caller, name) if storable_name(name) else None
    if sub is None:
        raise NotFound(
            f"you have no subscription named {name[:100]!r}; create it with PUT", code="subscription_not_found"
        )
    return sub


def _find(session: Session, caller: Caller, name: str) -> Subscription | None:
    return session.scalar(select(Subscription).where(Subscription.node_id == caller.node_id, Subscription.name == name))


def ensure_subscription(
    session: Session, caller: Caller, name: str, topic: str, settings: Settings
) -> tuple[Subscription, bool]:
    """The caller's 'read' scope is checked by the route (ReadCaller). A node keeps at most
    ``max_subscriptions_per_node`` subscriptions and creates at most ``max_topics_per_node`` topics."""
    if not storable_name(name):
        raise Malformed(
            f"invalid subscription name {name[:100]!r}: 1-{MAX_NAME_LENGTH} characters, no NUL", code="invalid_name"
        )
    check_topic_name(topic)

    def make() -> Subscription:
        kept = session.scalar(
            select(func.count()).select_from(Subscription).where(Subscription.node_id == caller.node_id)
        )
        if kept is not None and kept >= settings.max_subscriptions_per_node:
            raise Conflict(
                f"node {caller.node!r} keeps {kept} subscriptions, the most this broker allows "
                "(M2KT_MAX_SUBSCRIPTIONS_PER_NODE); delete one first",
                code="too_many_subscriptions",
            )
        check_topic_quota(session, caller, topic, settings.max_topics_per_node)
        row = get_or_create_topic(session, topic, caller.node_id)
        return Subscription(node_id=caller.node_id, name=name, topic_id=row.id, cursor=0)

    sub, created = insert_or_find(session, lambda: _find(session, caller, name), make)
    if not created and sub.topic.name != topic:
        raise Conflict(
            f"subscription {name!r} follows topic {sub.topic.name!r}, not {topic!r}",
            code="subscription_topic_mismatch",
        )
    session.refresh(sub)
    return sub, created


_PG_ACK = compiled(  # one statement, its own transaction: the cursor only moves forward, never past the topic's end
    update(Subscription)
    .where(
        Subscription.node_id == bindparam("node"),
        Subscription.name == bindparam("name"),
        Subscription.topic_id == Topic.id,
        Topic.last_seq >= bindparam("cursor"),
    )
    .values(
        cursor=func.greatest(Subscription.cursor, bindparam("cursor")),
        updated_at=case((Subscription.cursor < bindparam("cursor"), bindparam("now")), else_=Subscription.updated_at),
    )
    .returning(
        Subscription.name,
        Topic.name.label("topic"),
        Subscription.cursor,
        Subscription.created_at,
        Subscription.updated_at,
    )
)


def acknowledge_out(state: BrokerState, caller: Caller, name: str, cursor: int) -> SubscriptionOut:
    """Move the caller's subscription ``name`` forward to ``cursor`` (404 for no such subscription, 409
    ``cursor_ahead`` past the topic's last event). On Postgres one conditional UPDATE … RETURNING, which is
    its own transaction (every subscriber acks after every page); a refusal is then explained by the
    statement-by-statement path, which SQLite always takes."""
    if state.settings.is_postgres and storable_name(name):
        params = {"node": caller.node_id, "name": name, "cursor": cursor, "now": datetime.now(UTC)}
        with read_cursor(state.reads) as rows:
            row = rows.execute(_PG_ACK, params).fetchone()
        if row is not None:
            return SubscriptionOut(
                name=row.name,
                topic=row.topic,
                cursor=row.cursor,
                created_at=row.created_at.astimezone(UTC),
                updated_at=row.updated_at.astimezone(UTC),
            )
    with state.sessions.begin() as session:
        return subscription_out(acknowledge(session, caller, name, cursor))


_PG_CURSOR = compiled(
    select(Topic.name.label("topic"), Subscription.cursor)
    .join(Topic, Topic.id == Subscription.topic_id)
    .where(Subscription.node_id == bindparam("node"), Subscription.name == bindparam("name"))
)


def subscription_cursor(state: BrokerState, caller: Caller, name: str) -> tuple[str, int]:
    """(topic, cursor) of the caller's subscription ``name`` (404 when there is none): read before every page."""
    if state.settings.is_postgres and storable_name(name):
        with read_cursor(state.reads) as rows:
            row = rows.execute(_PG_CURSOR, {"node": caller.node_id, "name": name}).fetchone()
        if row is not None:
            return row.topic, row.cursor
    with state.reads() as session:
        sub = get_subscription(session, caller, name)
        return sub.topic.name, sub.cursor


def acknowledge(session: Session, caller: Caller, name: str, cursor: int) -> Subscription:
    sub = get_subscription(session, caller, name)
    if cursor > sub.topic.last_seq:
        raise Conflict(f"cursor {cursor} is past the topic's last event ({sub.topic.last_seq})", code="cursor_ahead")
    if cursor > sub.cursor:
        sub.cursor = cursor
        sub.updated_at = datetime.now(UTC)
    return sub
