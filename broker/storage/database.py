"""Small blobs as rows of the broker's own database (table ``inline_blobs``), for packets of a few KiB.

A small packet's S3 round trip costs more than the rest of its upload does; one INSERT on the database the
broker already talks to costs a fraction of it. Only :class:`~m2kt.broker.storage.tiered.TieredStore` uses
this store, for bodies of at most ``max_bytes`` (``M2KT_INLINE_BLOB_MAX_BYTES``); the bytes of a staged upload
stay in memory until complete() writes the row, so nothing is visible, or left behind, before it.
Every statement is its own transaction (autocommit), as every S3 request is.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine, bindparam, delete, literal_column, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from m2kt.broker.models import InlineBlob, utcnow
from m2kt.broker.storage.base import (
    BlobInfo,
    BlobNotFound,
    BlobStore,
    ChunkStream,
    StagedUpload,
    StorageError,
    check_key,
    check_range,
    new_staging_key,
)

__all__ = ["DatabaseStagedUpload", "DatabaseStore", "upsert", "upsert_values"]


@contextlib.contextmanager
def _database_errors(operation: str, key: str) -> Iterator[None]:
    try:
        yield
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0][:200]
        raise StorageError(f"database blob {operation} of {key!r} failed: {reason}") from exc


def upsert(postgres: bool) -> Any:
    """The statement that writes one blob (parameters: :func:`upsert_values`). Keys are content digests, so a
    row already there holds the same bytes: it is kept and its modification time renewed, as an S3 put of
    the same object would."""
    insert = pg_insert if postgres else sqlite_insert
    statement = insert(InlineBlob).values(
        key=bindparam("key"), size=bindparam("size"), body=bindparam("body"), modified=bindparam("modified")
    )
    renewed = {"modified": statement.excluded.modified}
    return statement.on_conflict_do_update(index_elements=[InlineBlob.key], set_=renewed)


def upsert_values(key: str, body: bytes) -> dict[str, Any]:
    return {"key": key, "size": len(body), "body": body, "modified": utcnow()}


class DatabaseStagedUpload(StagedUpload):
    """The bytes in memory until complete() writes them as one row under the staging key (or the caller writes
    them with their packet's row: :meth:`take_for_database`)."""

    def __init__(self, store: DatabaseStore, staging_key: str, final_key: str | None) -> None:
        super().__init__(staging_key, final_key)
        self._store = store
        self._buffer: bytearray | None = bytearray()
        self._in_database = False

    def fits(self, more: int) -> bool:
        """Whether ``more`` bytes still fit under the store's limit."""
        assert self._buffer is not None
        return len(self._buffer) + more <= self._store.max_bytes

    def held(self) -> bytes:
        """The bytes written so far (not yet stored)."""
        assert self._buffer is not None
        return bytes(self._buffer)

    def take_for_database(self) -> bytes | None:
        if self.final_key is None:
            return None
        body = self.held()
        self._completed_elsewhere()
        self._buffer, self._in_database = None, True
        return body

    def _write(self, view: memoryview) -> None:
        assert self._buffer is not None
        if not self.fits(view.nbytes):
            raise StorageError(f"{self.staging_key!r} is over the database store's {self._store.max_bytes} bytes")
        self._buffer += view

    def _complete(self) -> None:
        self._store.put(self.staging_key, self.held())
        self._buffer, self._in_database = None, True

    def _abort(self) -> None:
        self._buffer = None
        if self._in_database and self.staging_key != self.final_key:  # a private incoming/ row; a final key stays
            self._store.delete(self.staging_key)


class DatabaseStore(BlobStore):
    """Blobs of at most ``max_bytes`` as rows of ``inline_blobs`` on ``engine`` (the broker's database)."""

    def __init__(self, engine: Engine, max_bytes: int) -> None:
        self.engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.max_bytes = max_bytes
        self._postgres = engine.dialect.name == "postgresql"

    def stage(self, final_key: str | None = None) -> DatabaseStagedUpload:
        """Staged onto ``final_key`` when given (the row appears on complete()), else onto ``incoming/<uuid>``."""
        if final_key is not None:
            check_key(final_key)
        return DatabaseStagedUpload(self, final_key or new_staging_key(), final_key)

    def put(self, key: str, body: bytes) -> None:
        """Write ``body`` under ``key`` at once (see :func:`upsert`)."""
        check_key(key)
        with _database_errors("put", key), self.engine.connect() as connection:
            connection.execute(upsert(self._postgres), upsert_values(key, body))

    def promote(self, staging_key: str, final_key: str) -> None:
        if staging_key == final_key:
            if not self.exists(final_key):
                raise BlobNotFound(f"promote {final_key!r}: no such blob")
            return
        check_key(final_key)
        if self.exists(final_key):
            self.delete(staging_key)
            return
        try:
            with _database_errors("promote", final_key), self.engine.connect() as connection:
                moved = connection.execute(
                    update(InlineBlob).where(InlineBlob.key == staging_key).values(key=final_key)
                ).rowcount
        except StorageError as exc:
            if not isinstance(exc.__cause__, IntegrityError):
                raise
            self.delete(staging_key)  # the same content reached final_key meanwhile
            return
        if moved != 1:
            raise BlobNotFound(f"promote {staging_key!r}: no such staged blob")

    def _one(self, operation: str, key: str, *columns: Any) -> Any:
        check_key(key)
        with _database_errors(operation, key), self.engine.connect() as connection:
            row = connection.execute(select(*columns).where(InlineBlob.key == key)).first()
        if row is None:
            raise BlobNotFound(f"{operation} {key!r}: no such blob")
        return row

    def exists(self, key: str) -> bool:
        try:
            self._one("exists", key, literal_column("1"))
        except BlobNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._one("size", key, InlineBlob.size).size)

    def read(self, key: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        check_range(start, end)
        body = bytes(self._one("read", key, InlineBlob.body).body)
        part = io.BytesIO(body[start : len(body) if end is None else min(end, len(body))])
        return ChunkStream(part.read, part.close, None, chunk_size)

    def delete(self, key: str) -> None:
        check_key(key)
        with _database_errors("delete", key), self.engine.connect() as connection:
            connection.execute(delete(InlineBlob).where(InlineBlob.key == key))

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        """In byte order of the keys, as S3 lists them (Postgres: the C collation, whatever the database's)."""
        order = InlineBlob.key.collate("C") if self._postgres else InlineBlob.key
        query = (
            select(InlineBlob.key, InlineBlob.size, InlineBlob.modified)
            .where(InlineBlob.key.startswith(prefix, autoescape=True))
            .order_by(order)
        )
        with _database_errors("list", prefix), self.engine.connect() as connection:
            rows = connection.execute(query).all()
        for row in rows:
            yield BlobInfo(row.key, int(row.size), row.modified)

    def presigned_get(self, key: str, ttl_seconds: int) -> str | None:
        return None

    def holds_any(self) -> bool:
        """Whether the table holds any blob (one indexed row at most, whatever the table's size)."""
        with _database_errors("check", "inline_blobs"), self.engine.connect() as connection:
            return connection.execute(select(InlineBlob.key).limit(1)).first() is not None

    def check(self) -> None:
        self.holds_any()

    @property
    def description(self) -> str:
        return f"the database's inline_blobs table (blobs of at most {self.max_bytes} bytes)"
