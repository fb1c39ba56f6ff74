"""The blob-store interface: staged uploads that become visible under their final key, reads, listing.

Failures of the storage itself (unreachable, timed out, refused, disk errors) raise
:class:`StorageError`; a missing key raises :class:`BlobNotFound`. Backend exceptions never leak.
"""

from __future__ import annotations

import contextlib
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

__all__ = [
    "MIN_PART_SIZE",
    "STAGING_PREFIX",
    "BlobInfo",
    "BlobNotFound",
    "BlobStore",
    "StagedUpload",
    "StorageError",
    "UnfinishedUpload",
    "ChunkStream",
    "byte_view",
    "check_key",
    "check_range",
    "new_staging_key",
]

STAGING_PREFIX = "incoming/"
MIN_PART_SIZE = 5 << 20  # S3's minimum size for every part but the last


class StorageError(Exception):
    """A storage dependency failed (unreachable, timed out, refused). The broker answers 503."""


class BlobNotFound(StorageError):
    """The key does not exist."""


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    modified: datetime  # timezone-aware UTC


@dataclass(frozen=True)
class UnfinishedUpload:
    """A staged upload that never completed: a local ``incoming/`` file or an S3 multipart upload."""

    key: str
    started: datetime  # timezone-aware UTC
    upload_id: str | None = None  # S3 only


def new_staging_key() -> str:
    return f"{STAGING_PREFIX}{uuid.uuid4().hex}"


def byte_view(chunk: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(chunk)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def check_range(start: int, end: int | None) -> None:
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"invalid byte range [{start}, {end})")


class ChunkStream(Iterator[bytes]):
    """Chunks from an opened body; closes it when exhausted, on close() or when garbage-collected.

    A plain generator would not do: one that is never started never runs its ``finally``.
    """

    def __init__(
        self, read: Callable[[int], bytes], close: Callable[[], None], length: int | None, chunk_size: int
    ) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self._read = read
        self._close: Callable[[], None] | None = close
        self._remaining = length  # None: read to EOF
        self._chunk_size = chunk_size

    def __iter__(self) -> ChunkStream:
        return self

    def __next__(self) -> bytes:
        if self._close is None:
            raise StopIteration
        n = self._chunk_size if self._remaining is None else min(self._chunk_size, self._remaining)
        data = self._read(n) if n > 0 else b""
        if not data:
            self.close()
            raise StopIteration
        if self._remaining is not None:
            self._remaining -= len(data)
        return data

    def close(self) -> None:
        close, self._close = self._close, None
        if close is not None:
            close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class StagedUpload(ABC):
    """Bytes streamed to a staging key, never visible under the final key before complete().

    Use as a context manager to abort automatically unless :meth:`complete` succeeded::

        with store.stage(key) as upload:
            for chunk in body:
                upload.write(chunk)
            upload.complete()           # call only once the content is known to be right
        store.promote(upload.staging_key, key)

    Without a final key the staging key is a private ``incoming/<uuid4 hex>``. With one, a store
    may stage straight onto it (S3): ``staging_key == final_key``, the object appears under it on
    complete() — which therefore must only be called for content that belongs there — and
    promote() is a no-op. Because final keys are content digests that other uploads (and rows)
    may share, abort() never deletes an object under a final key: it only drops what was not
    completed yet.
    """

    staging_key: str
    final_key: str | None
    bytes_written: int

    def __init__(self, staging_key: str, final_key: str | None = None) -> None:
        self.staging_key = staging_key
        self.final_key = final_key
        self.bytes_written = 0
        self._state = "open"  # open -> completed | failed -> aborted

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        """Append bytes (copied: the buffer may be reused once this returns).

        S3 buffers one part and sends full parts from helper threads, up to ``s3.PARTS_IN_FLIGHT`` at
        once; write() blocks only while that many are in flight. A failed part is reported by a
        later write() or by complete()."""
        self._require_open("write to")
        view = byte_view(chunk)
        if view.nbytes:
            try:
                self._write(view)
            except BaseException:
                self._state = "failed"
                raise
            self.bytes_written += view.nbytes

    def complete(self) -> None:
        """Finish the staged object; it can then be promoted. After a failure only abort() is allowed."""
        self._require_open("complete")
        try:
            self._complete()
        except BaseException:
            self._state = "failed"
            raise
        self._state = "completed"

    def abort(self) -> None:
        """Remove everything staged. Safe to call twice and after complete(); raises StorageError if it could not."""
        if self._state != "aborted":
            self._abort()
            self._state = "aborted"

    def __enter__(self) -> StagedUpload:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._state == "completed":
            return
        if exc is None:
            self.abort()
        else:
            with contextlib.suppress(StorageError):  # keep the original error
                self.abort()

    def take_for_database(self) -> bytes | None:
        """The bytes, when this upload is to be kept in the broker's database under its final key and the caller
        writes them itself (:func:`~m2kt.broker.storage.database.upsert`, in the transaction that commits their
        row: blob and row appear together, or neither); the upload then counts as completed. ``None`` (every
        store but the database tier, or bytes that went to the large store): complete() as usual."""
        return None

    def _completed_elsewhere(self) -> None:
        """complete() done by someone else (the commit transaction that wrote the bytes with their row)."""
        self._require_open("complete")
        self._state = "completed"

    def _require_open(self, action: str) -> None:
        if self._state != "open":
            raise RuntimeError(f"cannot {action} staged upload {self.staging_key}: it is {self._state}")

    @abstractmethod
    def _write(self, view: memoryview) -> None: ...

    @abstractmethod
    def _complete(self) -> None: ...

    @abstractmethod
    def _abort(self) -> None: ...


class BlobStore(ABC):
    """Keys are "/"-separated relative paths such as ``packets/ab/abcdef…``."""

    @abstractmethod
    def stage(self, final_key: str | None = None) -> StagedUpload:
        """Start an upload to a fresh staging key ``incoming/<uuid4 hex>``, or, where the store can,
        straight onto ``final_key`` (S3: a multipart upload, invisible until complete()).

        Either way, promote(upload.staging_key, final_key) after complete() makes it available.
        """

    @abstractmethod
    def promote(self, staging_key: str, final_key: str) -> None:
        """Make the completed staged object available under final_key and remove the staging object.

        Final keys are content digests: if final_key already exists, it is kept and the staged copy dropped
        (so repeating a promote that succeeded is fine). Otherwise a missing staging key raises BlobNotFound.
        When staging_key == final_key (an upload staged onto its final key) this only checks the object is
        there (BlobNotFound otherwise).
        """

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int:
        """Size in bytes; raises BlobNotFound."""

    @abstractmethod
    def read(self, key: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Stream bytes [start, end) (end exclusive, None = to the end, clamped to the size) in chunks.

        Raises BlobNotFound here, before anything is yielded. Close the iterator if you stop early.
        """

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove key; a missing key is fine."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        """Every key starting with prefix (a plain string prefix), in lexicographic order."""

    @abstractmethod
    def presigned_get(self, key: str, ttl_seconds: int) -> str | None:
        """A URL that serves key directly for ttl_seconds, or None where there is none (local storage).

        Does not check that the key exists.
        """

    def unfinished_uploads(self) -> Iterator[UnfinishedUpload]:
        """Staged uploads still open (or abandoned by a crash): by default, the ``incoming/`` keys."""
        for info in self.list(STAGING_PREFIX):
            yield UnfinishedUpload(info.key, info.modified)

    def discard_unfinished(self, upload: UnfinishedUpload) -> None:
        """Remove an abandoned staged upload (gone already is fine)."""
        self.delete(upload.key)

    @abstractmethod
    def check(self) -> None:
        """Readiness probe: raise StorageError if the store cannot be used."""

    def create(self) -> bool:
        """Create the container (bucket, directory) if it is missing; True when it was created.

        An operator's step (``m2kt broker create-bucket``), never done implicitly by ``serve``."""
        return False

    @property
    @abstractmethod
    def description(self) -> str:
        """Where the blobs live, for logs: ``s3://bucket/prefix at <endpoint>`` or ``file:///abs/dir``."""


def check_key(key: str) -> None:
    if not key or key.startswith("/") or ".." in key or "\\" in key or "\x00" in key:
        raise ValueError(f"invalid storage key {key!r}")
    if any(part in ("", ".") for part in key.split("/")):
        raise ValueError(f"invalid storage key {key!r}: empty or '.' path segment")
