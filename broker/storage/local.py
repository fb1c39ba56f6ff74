"""Blobs as files under one directory (the embedded default): staged in ``incoming/``, renamed into place."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from m2kt.broker.storage.base import (
    STAGING_PREFIX,
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

__all__ = ["LocalStore"]


@contextlib.contextmanager
def _local_errors(operation: str, key: str) -> Iterator[None]:
    try:
        yield
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        raise BlobNotFound(f"{operation} {key!r}: no such blob") from exc
    except OSError as exc:
        raise StorageError(f"local storage {operation} of {key!r} failed: {exc}") from exc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _LocalStagedUpload(StagedUpload):
    def __init__(self, store: LocalStore, staging_key: str, final_key: str | None) -> None:
        super().__init__(staging_key, final_key)
        self._path = store._path(staging_key)
        self._part_path = self._path.with_name(self._path.name + ".part")
        with _local_errors("stage", staging_key):
            self._file: BinaryIO | None = open(self._part_path, "xb")

    def _write(self, view: memoryview) -> None:
        assert self._file is not None
        with _local_errors("write", self.staging_key):
            self._file.write(view)

    def _complete(self) -> None:
        assert self._file is not None
        with _local_errors("complete", self.staging_key):
            file, self._file = self._file, None
            try:
                file.flush()
                os.fsync(file.fileno())
            finally:
                file.close()
            os.replace(self._part_path, self._path)

    def _abort(self) -> None:
        with _local_errors("abort", self.staging_key):
            if self._file is not None:
                file, self._file = self._file, None
                file.close()
            self._part_path.unlink(missing_ok=True)
            self._path.unlink(missing_ok=True)


class LocalStore(BlobStore):
    """Blobs as files under one directory; for development and single-node deployments."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self._incoming = self.root / STAGING_PREFIX.rstrip("/")
        self._incoming.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        check_key(key)
        return self.root.joinpath(*key.split("/"))

    def stage(self, final_key: str | None = None) -> StagedUpload:
        """Always written under ``incoming/`` (a rename is cheap); final_key is only checked here."""
        if final_key is not None:
            check_key(final_key)
        return _LocalStagedUpload(self, new_staging_key(), final_key)

    def promote(self, staging_key: str, final_key: str) -> None:
        staged, final = self._path(staging_key), self._path(final_key)
        if staging_key == final_key:
            if not final.is_file():
                raise BlobNotFound(f"promote {final_key!r}: no such blob")
            return
        with _local_errors("promote", final_key):
            if final.is_file():
                staged.unlink(missing_ok=True)
                return
        if not staged.is_file():
            raise BlobNotFound(f"promote {staging_key!r}: no such staged blob")
        with _local_errors("promote", final_key):
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, final)  # the staged file was fsynced by complete()
            _fsync_dir(final.parent)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        with _local_errors("size", key):
            st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise BlobNotFound(f"size {key!r}: no such blob")
        return st.st_size

    def read(self, key: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        check_range(start, end)
        path = self._path(key)
        with _local_errors("read", key):
            file = open(path, "rb")
            try:
                size = os.fstat(file.fileno()).st_size
                stop = size if end is None else min(end, size)
                file.seek(start)
            except BaseException:
                file.close()
                raise

        def read_chunk(n: int) -> bytes:
            with _local_errors("read", key):
                return file.read(n)

        return ChunkStream(read_chunk, file.close, max(0, stop - start), chunk_size)

    def delete(self, key: str) -> None:
        with _local_errors("delete", key):
            self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        """Like S3, plus the ``incoming/<uuid>.part`` files of uploads still being written."""
        # Start at the deepest directory the prefix names; filter the rest by string prefix.
        base = prefix.rpartition("/")[0]
        if base:
            check_key(base)
        top = self.root.joinpath(*base.split("/")) if base else self.root
        yield from self._walk(top, f"{base}/" if base else "", prefix)

    def _walk(self, directory: Path, rel: str, prefix: str) -> Iterator[BlobInfo]:
        try:
            with os.scandir(directory) as it:
                entries = [(e.name + "/" if e.is_dir(follow_symlinks=False) else e.name, e) for e in it]
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise StorageError(f"local storage list of {rel!r} failed: {exc}") from exc
        # Sorting directories as "name/" yields keys in exact lexicographic order.
        for name, entry in sorted(entries, key=lambda pair: pair[0]):
            key = rel + name
            if name.endswith("/"):
                if key.startswith(prefix) or prefix.startswith(key):
                    yield from self._walk(Path(entry.path), key, prefix)
            elif key.startswith(prefix) and entry.is_file(follow_symlinks=False):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted while listing
                yield BlobInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def presigned_get(self, key: str, ttl_seconds: int) -> str | None:
        return None

    def check(self) -> None:
        if not self._incoming.is_dir() or not os.access(self._incoming, os.W_OK | os.X_OK):
            raise StorageError(f"local storage {self.description} is missing or not writable")

    @property
    def description(self) -> str:
        return self.root.as_uri()
