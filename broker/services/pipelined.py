"""Postgres pipelines on a session's own connection: several statements, one round trip.

Every round trip from a worker thread gives up the GIL and then waits to take it back; under load, with
every upload's threads and the event loop sharing one GIL, those waits were most of an upload's time in its
commit transaction — and the topic row the event append locks stayed locked through one of them. psycopg's
pipeline mode sends a batch of statements at once and reads all their results at one sync.

The statements are SQLAlchemy Core, compiled for Postgres once (:func:`compiled`), so the tables stay
defined in :mod:`m2kt.broker.models` alone. A driver error is raised as SQLAlchemy raises it
(:func:`driver_errors`), so the app's handlers answer it as they answer any other database error
(``OperationalError`` → 503 ``database_unavailable``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.sql import ClauseElement

__all__ = ["compiled", "driver_connection", "driver_errors"]

_DIALECT = postgresql.psycopg.dialect()  # type: ignore[attr-defined]


def compiled(statement: ClauseElement) -> str:
    """``statement`` as psycopg's SQL, with ``%(name)s`` for each bound parameter (``bindparam(name)``)."""
    return str(statement.compile(dialect=_DIALECT))


def driver_connection(session: Session) -> tuple[Connection, psycopg.Connection[Any]]:
    """The session's connection (its transaction begun) and the psycopg connection under it."""
    connection = session.connection()
    raw = connection.connection.driver_connection
    assert isinstance(raw, psycopg.Connection), "a pipeline needs Postgres through psycopg"
    return connection, raw


@contextmanager
def driver_errors(connection: Connection, raw: psycopg.Connection[Any], statement: str) -> Iterator[None]:
    """Raise a psycopg error as the SQLAlchemy exception it maps to; a connection the error broke is
    invalidated, so the pool does not hand it out again."""
    try:
        yield
    except psycopg.Error as error:
        if raw.broken or raw.closed:
            connection.invalidate(error)
        raise DBAPIError.instance(statement, None, error, psycopg.Error) from None
