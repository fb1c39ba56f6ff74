"""The broker's database plumbing: pooled connections checked only when they may be dead, autocommit reads,
and statements sent in one pipeline (each against the real PostgreSQL)."""

from __future__ import annotations

import time

import psycopg
import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError

from m2kt.benchmarks.harness.services import libpq_url
from m2kt.broker.db import make_engine, make_read_sessionmaker, make_sessionmaker
from m2kt.broker.models import Topic
from m2kt.broker.services.pipelined import compiled, driver_connection, driver_errors


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
