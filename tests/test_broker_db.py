"""The broker's database plumbing: pooled connections checked only when they may be dead, autocommit reads,
and statements sent in one pipeline (each against the real PostgreSQL)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from sqlalchemy import bindparam, select, text
from sqlalchemy.exc import OperationalError, ProgrammingError

from m2kt.benchmarks.harness.services import libpq_url
from m2kt.broker.db import make_engine, make_read_sessionmaker, make_sessionmaker
from m2kt.broker.errors import NotFound, Unauthorized
from m2kt.broker.models import Role, Topic
from m2kt.broker.services.auth import authenticate
from m2kt.broker.services.nodes import create_node, issue_token
from m2kt.broker.services.pages import raw_event_page
from m2kt.broker.services.pipelined import compiled, driver_connection, driver_errors, read_pipeline


def _backend_pid(engine) -> int:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return int(conn.execute(text("select pg_backend_pid()")).scalar_one())


def _terminate(url: str, pid: int) -> None:
    """Terminate a backend and wait until it is gone (it says goodbye to its client first)."""
    with psycopg.connect(libpq_url(url), autocommit=True) as admin:
        assert admin.execute("select pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        for _ in range(10_000):  # gone within milliseconds; no deadline a busy machine could break
            if admin.execute("select count(*) from pg_stat_activity where pid = %s", (pid,)).fetchone() == (0,):
                return
            time.sleep(0.01)
        raise AssertionError(f"backend {pid} is still there")


def test_a_pooled_connection_whose_backend_was_terminated_is_replaced_before_use(postgres_url: str) -> None:
    """No ping on every checkout, yet a backend terminated while its connection sat in the pool (the server
    says so before closing) is noticed at the next checkout and replaced: the next query just works."""
    engine = make_engine(postgres_url)
    try:
        pid = _backend_pid(engine)
        assert _backend_pid(engine) == pid  # the pool hands the same connection out again
        _terminate(postgres_url, pid)
        assert _backend_pid(engine) != pid
    finally:
        engine.dispose()


def test_read_sessions_send_no_transaction_of_their_own(postgres_url: str) -> None:
    """A read session runs each statement in autocommit: outside any transaction block."""
    engine = make_engine(postgres_url)
    try:
        same_transaction = "select now() = statement_timestamp()"  # true only in a statement's own transaction
        with make_read_sessionmaker(engine)() as session:
            session.execute(text("select pg_sleep(0.01)"))
            assert session.execute(text(same_transaction)).scalar_one() is True
        with make_sessionmaker(engine)() as session:
            session.execute(text("select pg_sleep(0.01)"))
            assert session.execute(text(same_transaction)).scalar_one() is False
    finally:
        engine.dispose()


def test_a_pipeline_error_is_raised_as_sqlalchemy_raises_it(postgres_url: str) -> None:
    """A driver error inside a pipeline is the SQLAlchemy exception the app's handlers know (OperationalError
    → 503), and the session rolls back cleanly afterwards."""
    engine = make_engine(postgres_url)
    try:
        sessions = make_sessionmaker(engine)
        statement = compiled(select(Topic.id).where(Topic.name == "x"))
        assert "%(name_1)s" in statement
        with pytest.raises(OperationalError), sessions.begin() as session:
            connection, raw = driver_connection(session)
            with driver_errors(connection, raw, "select pg_terminate_backend(pg_backend_pid())"), raw.pipeline():
                raw.execute("select pg_terminate_backend(pg_backend_pid())")
        with sessions() as session:  # the broken connection was invalidated: the pool opens a new one
            assert session.execute(text("select 1")).scalar_one() == 1
    finally:
        engine.dispose()


def _sqlite_and_postgres(tmp_path, broker_database: str):  # type: ignore[no-untyped-def]
    """(read sessions, write sessions) on a fresh SQLite file and on the session's migrated Postgres."""
    from m2kt.broker.db import upgrade

    sqlite = f"sqlite:///{tmp_path / 'broker.db'}"
    upgrade(sqlite)
    out = []
    for url in (sqlite, broker_database):
        engine = make_engine(url)
        out.append((engine, make_read_sessionmaker(engine), make_sessionmaker(engine)))
    return out


def test_authentication_reads_the_same_caller_through_the_driver_as_through_sqlalchemy(
    tmp_path, broker_database: str
) -> None:
    """On Postgres a token is looked up with one driver round trip (no SQLAlchemy statement): the caller is
    the same as SQLite's through SQLAlchemy — the role an enum member, the expiry an aware UTC time — and an
    expired token is refused the same way."""
    callers, refusals = [], []
    expires = datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)
    for engine, reads, sessions in _sqlite_and_postgres(tmp_path, broker_database):
        try:
            name = f"reader-{engine.dialect.name}-{time.monotonic_ns()}"
            with sessions.begin() as session:
                node, _ = create_node(session, None, name, Role.student, ["read"], None, secret=f"m2kt_{name}_live")
                issue_token(session, node, ["read"], None, secret=f"m2kt_{name}_gone", expires_at=expires)
            caller = authenticate(reads, f"m2kt_{name}_live")
            callers.append((caller.role, caller.scopes, caller.token_expires_at, caller.node == name))
            assert isinstance(caller.role, Role)
            later = authenticate(reads, f"m2kt_{name}_gone")
            assert later.token_expires_at == expires and later.token_expires_at.tzinfo is not None
            assert later.token_expires_at.utcoffset() == timedelta(0)
            with sessions.begin() as session:
                session.execute(
                    text("update api_tokens set expires_at = :t where id = :i"),
                    {"t": datetime.now(UTC) - timedelta(seconds=1), "i": later.token_id},
                )
            with pytest.raises(Unauthorized) as refused:
                authenticate(reads, f"m2kt_{name}_gone")
            refusals.append(refused.value.code)
        finally:
            engine.dispose()
    assert callers[0] == callers[1] == (Role.student, ("read",), None, True)
    assert refusals == ["token_expired", "token_expired"]


def test_a_read_pipeline_returns_each_statements_rows_and_its_errors_as_sqlalchemys(broker_database: str) -> None:
    engine = make_engine(broker_database)
    try:
        reads = make_read_sessionmaker(engine)
        one = compiled(select(Topic.id).where(Topic.name == bindparam("name")))
        rows = read_pipeline(reads, [(one, {"name": "no.such.topic"}), ("select 1 as a, 2 as b", {})])
        assert rows[0] == [] and rows[1][0].a == 1 and rows[1][0].b == 2
        with pytest.raises(ProgrammingError):
            read_pipeline(reads, [("select 1", {}), ("select no_such_column from topics", {})])
        assert read_pipeline(reads, [("select 3 as c", {})])[0][0].c == 3  # the pooled connection still works
    finally:
        engine.dispose()


def test_an_event_page_of_a_missing_topic_is_404_on_both_databases(tmp_path, broker_database: str) -> None:
    for engine, reads, _ in _sqlite_and_postgres(tmp_path, broker_database):
        try:
            for name in ("no.such.topic", "not a topic\x00"):
                with pytest.raises(NotFound):
                    raw_event_page(reads, name, 0, 10)
        finally:
            engine.dispose()
