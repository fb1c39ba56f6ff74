"""Small blobs in the database, the rest in the blob store: one store to the rest of the broker.

An upload is buffered until it is over the database store's limit; then it goes to the large store (S3 or a
directory) as it would have without this tier, its buffered bytes first. So a packet of a few KiB costs one
INSERT instead of an S3 round trip, and a large one streams exactly as before. Reads, sizes and deletes look
in the database first (one indexed read), then in the large store; listing merges the two in key order, so
garbage collection sees both. A small blob has no presigned URL: it is served through the broker.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from m2kt.broker.storage.base import BlobInfo, BlobNotFound, BlobStore, StagedUpload, UnfinishedUpload
from m2kt.broker.storage.database import DatabaseStagedUpload, DatabaseStore

__all__ = ["TieredStore"]


class _TieredUpload(StagedUpload):
    """A database upload while the bytes fit under ``small.max_bytes``; past that, a staged upload on the large
    store, the bytes held so far first.

    ``staging_key`` is the large store's once the upload moved there (read it after complete())."""

    def __init__(self, store: TieredStore, final_key: str | None) -> None:
        self._small: DatabaseStagedUpload | None = store.small.stage(final_key)
        super().__init__(self._small.staging_key, final_key)
        self._store = store
        self._large: StagedUpload | None = None

    def _current(self) -> StagedUpload:
        upload = self._large or self._small
        assert upload is not None
        return upload

    def _write(self, view: memoryview) -> None:
        small = self._small
        if small is not None and not small.fits(view.nbytes):
            held = small.held()
            small.abort()
            self._small, self._large = None, self._store.large.stage(self.final_key)
            self.staging_key = self._large.staging_key
            if held:
                self._large.write(held)
        self._current().write(view)

    def _complete(self) -> None:
        self._current().complete()

    def take_for_database(self) -> bytes | None:
        body = self._small.take_for_database() if self._small is not None else None
        if body is not None:
            self._completed_elsewhere()
        return body

    def _abort(self) -> None:
        self._current().abort()


class TieredStore(BlobStore):
    """``small`` (the database) for blobs of at most ``small.max_bytes``, ``large`` for the rest."""

    def __init__(self, small: DatabaseStore, large: BlobStore) -> None:
        self.small = small
        self.large = large

    def stage(self, final_key: str | None = None) -> StagedUpload:
        if self.small.max_bytes <= 0:  # reads only: blobs stored inline before the tier was turned off
            return self.large.stage(final_key)
        return _TieredUpload(self, final_key)

    def promote(self, staging_key: str, final_key: str) -> None:
        if staging_key == final_key:
            if not self.exists(final_key):
                raise BlobNotFound(f"promote {final_key!r}: no such blob")
            return
        if self.small.exists(final_key):  # there already: keep it, drop the staged copy wherever it is
            self.small.delete(staging_key)
            self.large.delete(staging_key)
            return
        if self.small.exists(staging_key):
            if self.large.exists(final_key):  # the same content, stored large before: keep that one
                self.small.delete(staging_key)
            else:
                self.small.promote(staging_key, final_key)
            return
        self.large.promote(staging_key, final_key)

    def exists(self, key: str) -> bool:
        return self.small.exists(key) or self.large.exists(key)

    def size(self, key: str) -> int:
        try:
            return self.small.size(key)
        except BlobNotFound:
            return self.large.size(key)

    def read(self, key: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        try:
            return self.small.read(key, start, end, chunk_size)
        except BlobNotFound:
            return self.large.read(key, start, end, chunk_size)

    def delete(self, key: str) -> None:
        self.small.delete(key)
        self.large.delete(key)

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        return heapq.merge(self.small.list(prefix), self.large.list(prefix), key=lambda info: info.key)

    def presigned_get(self, key: str, ttl_seconds: int) -> str | None:
        return None if self.small.exists(key) else self.large.presigned_get(key, ttl_seconds)

    def unfinished_uploads(self) -> Iterator[UnfinishedUpload]:
        yield from self.small.unfinished_uploads()
        yield from self.large.unfinished_uploads()

    def discard_unfinished(self, upload: UnfinishedUpload) -> None:
        if upload.upload_id is None:
            self.small.delete(upload.key)
        self.large.discard_unfinished(upload)

    def check(self) -> None:
        self.small.check()
        self.large.check()

    def create(self) -> bool:
        return self.large.create()

    @property
    def description(self) -> str:
        return f"{self.large.description}, and packets of at most {self.small.max_bytes} bytes in the database"
