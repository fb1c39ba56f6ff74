"""Blob storage for packet files: one small interface, a local-directory and an S3 implementation, and a
tier that keeps small blobs in the broker's database in front of either (``M2KT_INLINE_BLOB_MAX_BYTES``:
:mod:`.tiered`, :mod:`.database`).

Uploads are staged and only become visible under their final key (a content digest) once they
are complete and promoted. Local uploads are written under ``incoming/<uuid4 hex>`` and renamed by
:meth:`BlobStore.promote`. An S3 upload that is given its final key up front
(``store.stage(final_key)``) is a multipart upload on that key: it is invisible until
:meth:`StagedUpload.complete`, so nothing is copied afterwards and promote() only checks it is
there. Everything here is synchronous; the broker calls it from worker threads. A store may be
shared between threads, a :class:`StagedUpload` may not (S3 sends its parts from a few helper
threads of its own).

Failures of the storage itself (unreachable, timed out, refused, disk errors) raise
:class:`StorageError`; a missing key raises :class:`BlobNotFound`. Backend exceptions never leak.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote

from sqlalchemy import Engine

from m2kt.broker.storage.base import (
    BlobInfo,
    BlobNotFound,
    BlobStore,
    StagedUpload,
    StorageError,
    UnfinishedUpload,
)
from m2kt.broker.storage.database import DatabaseStore
from m2kt.broker.storage.local import LocalStore
from m2kt.broker.storage.s3 import S3Store, make_s3_client
from m2kt.broker.storage.tiered import TieredStore

__all__ = [
    "BlobInfo",
    "BlobNotFound",
    "BlobStore",
    "DatabaseStore",
    "LocalStore",
    "S3Store",
    "StagedUpload",
    "StorageError",
    "TieredStore",
    "UnfinishedUpload",
    "make_s3_client",
    "inline_blobs_stored",
    "storage_from_url",
    "with_inline_blobs",
    "with_inline_blobs_found",
]


def storage_from_url(
    url: str, *, endpoint_url: str | None = None, part_size: int = 8 << 20, public_endpoint_url: str | None = None
) -> BlobStore:
    """'s3://bucket' or 's3://bucket/prefix' -> S3Store (endpoint from the argument, else AWS_ENDPOINT_URL_S3, else
    AWS_ENDPOINT_URL, else AWS default; presigned URLs for ``public_endpoint_url`` when given);
    'file:///abs/dir', 'file://relative/dir' or a plain path -> LocalStore.
    Anything else -> ValueError naming the accepted forms."""
    accepted = "expected 's3://bucket[/prefix]', 'file:///absolute/dir', 'file://relative/dir' or a plain path"
    if not url.strip():
        raise ValueError(f"empty storage URL: {accepted}")
    scheme, sep, rest = url.partition("://")
    if not sep:
        return LocalStore(Path(url))
    if scheme.lower() == "file":
        if not rest:
            raise ValueError(f"storage URL {url!r} names no directory: {accepted}")
        return LocalStore(Path(unquote(rest)))
    if scheme.lower() == "s3":
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValueError(f"storage URL {url!r} names no bucket: {accepted}")
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        presign = make_s3_client(public_endpoint_url) if public_endpoint_url else None
        return S3Store(make_s3_client(endpoint), bucket, prefix, part_size=part_size, presign_client=presign)
    raise ValueError(f"unsupported storage URL {url!r}: {accepted}")


def with_inline_blobs(storage: BlobStore, engine: Engine, max_bytes: int, *, stored_before: bool = False) -> BlobStore:
    """``storage`` with packets of at most ``max_bytes`` kept in the database ``engine`` talks to
    (``M2KT_INLINE_BLOB_MAX_BYTES``). With 0, ``storage`` as it is, unless blobs were ``stored_before`` in the
    database: they are then still read, listed and collected, and new ones all go to ``storage``."""
    if isinstance(storage, TieredStore) or (max_bytes <= 0 and not stored_before):
        return storage
    return TieredStore(DatabaseStore(engine, max_bytes), storage)


def inline_blobs_stored(engine: Engine) -> bool:
    """Whether the database holds any inline blob (a migrated schema is assumed)."""
    return DatabaseStore(engine, 0).holds_any()


def with_inline_blobs_found(storage: BlobStore, engine: Engine, max_bytes: int) -> BlobStore:
    """:func:`with_inline_blobs`, looking in the database (so: once the schema is checked) only when the setting
    is 0, for blobs stored while it was on."""
    found = max_bytes <= 0 and not isinstance(storage, TieredStore) and inline_blobs_stored(engine)
    return with_inline_blobs(storage, engine, max_bytes, stored_before=found)
