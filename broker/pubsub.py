"""Waking subscribers: an in-process hub, fed across replicas by Postgres LISTEN/NOTIFY.

A topic's events are committed with a NOTIFY in the same transaction (Postgres delivers it on
commit), and the committing process also pokes its own hub after commit. Waiters register
*before* they query, so a wake-up between query and wait is never lost; and they re-query every
``poll_fallback_seconds`` anyway, so even a dropped notification only delays, never loses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy import event as orm_event
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("m2kt.broker.pubsub")
CHANNEL = "m2kt_events"


class Hub:
    """Per-topic wake-ups for coroutines on one event loop; ``notify`` is safe from any thread."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: dict[str, asyncio.Event] = {}

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def listen(self, topic: str) -> asyncio.Event:
        """The event the next notification for ``topic`` sets. Call before querying."""
        event = self._events.get(topic)
        if event is None:
            event = self._events[topic] = asyncio.Event()
        return event

    def _wake(self, topic: str | None) -> None:
        if topic is None:
            events, self._events = list(self._events.values()), {}
        else:
            popped = self._events.pop(topic, None)
            events = [popped] if popped is not None else []
        for event in events:
            event.set()

    def notify(self, topic: str | None) -> None:
        """Wake waiters on ``topic`` (None: everyone). Thread-safe."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake(topic)
        else:
            loop.call_soon_threadsafe(self._wake, topic)


_PENDING = "m2kt_notify"  # session.info key: topics to wake once this session commits


def wire_notifications(sessions: sessionmaker[Session], hub: Hub) -> None:
    """After a commit, wake ``hub``'s local waiters on the topics that session appended events to."""

    @orm_event.listens_for(sessions, "after_commit")
    def _after_commit(session: Session) -> None:
        for topic in session.info.pop(_PENDING, ()):
            hub.notify(topic)

    @orm_event.listens_for(sessions, "after_rollback")
    def _after_rollback(session: Session) -> None:
        session.info.pop(_PENDING, None)


def wake_after_commit(session: Session, topic: str) -> None:
    """Wake this process's waiters on ``topic`` once the session commits. Other replicas hear of it from
    the ``pg_notify(CHANNEL, topic)`` the event's own statement sends on Postgres
    (:func:`m2kt.broker.services.topics.append_event`)."""
    pending: set[str] = session.info.setdefault(_PENDING, set())
    pending.add(topic)


async def listen_postgres(url: str, hub: Hub, stop: asyncio.Event) -> None:
    """LISTEN on the events channel until ``stop``; reconnects with backoff."""
    import psycopg

    dsn = "postgresql://" + url.split("://", 1)[1]
    backoff = 0.5
    while not stop.is_set():
        try:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                await conn.execute(f"LISTEN {CHANNEL}")
                backoff = 0.5
                hub.notify(None)  # we may have missed notifications while disconnected
                while not stop.is_set():  # notifies(timeout=) returns regularly, so stop is honoured
                    async for notification in conn.notifies(timeout=0.5):
                        hub.notify(notification.payload)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure: log, back off, reconnect
            log.warning("LISTEN connection lost (%s); reconnecting in %.1fs", exc, backoff)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, 10.0)
