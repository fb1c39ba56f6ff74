"""Engine, sessions, and the schema check: Alembic (migrations/) is the only way the schema changes."""

from __future__ import annotations

import importlib.util
import select
import time
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.orm import Session, sessionmaker


def _migrations_dir() -> Path:
    """Where the Alembic scripts are (the ``m2kt.migrations`` package), found without importing them."""
    spec = importlib.util.find_spec("m2kt.migrations")
    assert spec is not None and spec.submodule_search_locations, "the m2kt.migrations package is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


MIGRATIONS_DIR = _migrations_dir()


class SchemaOutOfDate(RuntimeError):
    """The database schema is not at the revision this code expects."""


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    engine = create_engine(url, pool_size=10, max_overflow=20, pool_recycle=1800)
    _ping_after_idle(engine, IDLE_PING_SECONDS)
    return engine


IDLE_PING_SECONDS = 30.0


def _has_pending_input(dbapi_conn: Any) -> bool:
    """Whether the server sent something to a connection that is idle in the pool: an idle connection is sent
    nothing, so that is a terminated backend's farewell (or end of file). One ``poll``, no round trip."""
    try:
        fd = dbapi_conn.fileno()
    except Exception:  # noqa: BLE001 - closed or broken: certainly worth a ping
        return True
    readable, _, _ = select.select([fd], [], [], 0)
    return bool(readable)


def _ping_after_idle(engine: Engine, idle: float) -> None:
    """Check a pooled connection before use only when it may be dead: the server has written to it while it
    was idle (a terminated backend says so before it closes), or it sat unused for over ``idle`` seconds (a
    peer that vanished without a word).

    ``pool_pre_ping`` costs a round trip on every checkout, three per upload, although a connection used a
    moment ago is almost always alive. A dead one that slips through fails its statement, which SQLAlchemy
    recognises as a disconnect and answers by discarding the pool (that request gets 503, the next a fresh
    connection)."""

    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_conn: Any, record: Any) -> None:
        record.info["m2kt_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _borrowed(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("m2kt_idle_since")
        if since is None or (time.monotonic() - since <= idle and not _has_pending_input(dbapi_conn)):
            return
        try:
            with dbapi_conn.cursor() as cur:
                cur.execute("SELECT 1")
            if not dbapi_conn.autocommit:
                dbapi_conn.rollback()
        except Exception as error:  # noqa: BLE001 - any failure: the pool replaces this connection
            raise exc.DisconnectionError(str(error)) from error


def is_postgres(sessions: sessionmaker[Session]) -> bool:
    """Whether ``sessions`` talk to Postgres (through psycopg)."""
    bind = sessions.kw.get("bind")
    return bind is not None and bind.dialect.name == "postgresql"


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def make_read_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions for reads that need no transaction of their own (authentication, header checks, event pages):
    each statement commits by itself, so a read costs its round trip and no BEGIN or ROLLBACK. On Postgres's
    READ COMMITTED each statement saw its own snapshot anyway. Never write through one of these, but for a
    single statement that is a whole transaction by itself (a subscription's conditional ack: one UPDATE)."""
    return sessionmaker(engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False)


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None, "migrations/ has no revisions"
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def ensure_sqlite_dir(url: str) -> None:
    """Create the directory of a SQLite file URL (SQLite creates the file, not its folder)."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


def upgrade(url: str, revision: str = "head") -> None:
    ensure_sqlite_dir(url)
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def check_schema(engine: Engine) -> None:
    """Raise SchemaOutOfDate, naming the command that fixes it, unless the schema is at head."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        where = "empty" if current is None else f"at revision {current}"
        raise SchemaOutOfDate(
            f"the database schema is {where}, but this broker needs revision {head}: run `m2kt broker migrate`"
        )
