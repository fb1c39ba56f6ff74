"""Create-or-get that holds under concurrency: the database's unique constraint decides who created.

Twenty simultaneous ``PUT /v1/subscriptions/one`` all find no row, all insert, and all but one hit
the unique constraint. Each insert runs in a savepoint, so the loser rolls back only the savepoint,
reads the winner's row (committed by then: Postgres makes the loser's insert wait for the winner's
commit, SQLite serialises writers) and answers as if it had come second.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

__all__ = ["insert_or_find"]

T = TypeVar("T")


def insert_or_find(session: Session, find: Callable[[], T | None], make: Callable[[], T]) -> tuple[T, bool]:
    """``(row, True)`` for a row this call inserted, ``(existing, False)`` for one that exists or that a
    concurrent request inserted first. ``make`` builds the row (not yet added); ``find`` looks it up by
    the unique key ``make`` would collide on."""
    existing = find()
    if existing is not None:
        return existing, False
    row = make()
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        existing = find()
        if existing is None:  # some other constraint failed: not a race this helper resolves
            raise
        return existing, False
    return row, True
