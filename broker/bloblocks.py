"""One lock per blob key, shared by the upload that commits a row for a blob and by garbage collection.

An upload holds it from making its blob visible (complete + promote) until its row is committed;
garbage collection takes it (without waiting) before it re-checks and deletes a blob. So a blob is
never deleted between being promoted and its row being committed, however slow either side is.

On PostgreSQL the lock is a transaction-level advisory lock (``pg_advisory_xact_lock``), so it
spans broker replicas and ``m2kt broker gc`` processes and is released at commit or rollback — or
when a killed process's connection drops. On SQLite (the embedded default, one process) it is one
of a fixed set of in-process locks, taken before the transaction starts and released after it ends.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from m2kt.broker.db import is_postgres

_STRIPES = [threading.Lock() for _ in range(256)]


def blob_lock_id(key: str) -> int:
    """A signed 64-bit id for the key (what advisory locks take)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)


@contextmanager
def locked_transaction(sessions: sessionmaker[Session], key: str) -> Iterator[Session]:
    """A transaction (committed on success) holding ``key``'s lock from before its first statement to its end."""
    if is_postgres(sessions):
        with sessions.begin() as session:
            session.execute(select(func.pg_advisory_xact_lock(blob_lock_id(key))))
            yield session
        return
    stripe = _STRIPES[blob_lock_id(key) % len(_STRIPES)]
    with stripe, sessions.begin() as session:
        yield session


@contextmanager
def try_locked_transaction(sessions: sessionmaker[Session], key: str) -> Iterator[Session | None]:
    """Like :func:`locked_transaction`, but yields None at once when someone else holds the lock."""
    if is_postgres(sessions):
        with sessions.begin() as session:
            got = session.scalar(select(func.pg_try_advisory_xact_lock(blob_lock_id(key))))
            yield session if got else None
        return
    stripe = _STRIPES[blob_lock_id(key) % len(_STRIPES)]
    if not stripe.acquire(blocking=False):
        yield None
        return
    try:
        with sessions.begin() as session:
            yield session
    finally:
        stripe.release()
