"""One pass over a packet's data section: its sha256 and that no float tensor holds NaN or Inf."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from m2kt.errors import PacketFormatError, VerificationError
from m2kt.format.dtypes import DTYPES, has_nonfinite
from m2kt.format.header import PacketHeader

__all__ = ["CHUNK", "THREAD_MIN_BYTES", "DataChecker", "check_data", "iter_buffer", "iter_file"]

CHUNK = 8 << 20  # bytes per read/hash step; a power of two, so float elements never straddle chunks of a file
THREAD_MIN_BYTES = 4 << 20  # below this, hashing in a helper thread costs more than it saves


class DataChecker:
    """Incremental check of a packet's data section: its sha256 and that floats are finite.

    Feed the bytes after the header, in order, in chunks of any size. The sha256 runs in a helper
    thread, overlapping the finite check and the caller's next read, so a buffer passed to
    :meth:`update` must stay unchanged until the following ``update`` or ``finish`` returns.

    >>> checker = DataChecker(header)          # doctest: +SKIP
    >>> for chunk in body: checker.update(chunk)
    >>> checker.finish()                        # raises PacketError, or returns the digest
    """

    def __init__(self, header: PacketHeader, *, threaded: bool | None = None) -> None:
        self.header = header
        self._sha = hashlib.sha256()
        self._pos = 0
        self._floats = [
            (t.data_offsets[0], t.data_offsets[1], DTYPES[t.dtype], t.name)
            for t in header.tensors
            if DTYPES[t.dtype].exponent_mask is not None and t.data_offsets[1] > t.data_offsets[0]
        ]
        self._next = 0  # index of the first float region not yet fully checked
        self._carry = b""  # a float element split across chunks
        self.nonfinite: str | None = None  # name of the first tensor with Inf/NaN
        use_thread = header.data_size >= THREAD_MIN_BYTES if threaded is None else threaded
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="m2kt-sha256") if use_thread else None
        self._pending: Future[None] | None = None

    @property
    def position(self) -> int:
        return self._pos

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        view = memoryview(chunk).cast("B")
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        if self._pool is not None and len(view) >= 65536:
            self._pending = self._pool.submit(self._sha.update, view)
        else:
            self._sha.update(view)
        if self.nonfinite is None:
            self._check_floats(view)
        self._pos += len(view)

    def _check_floats(self, view: memoryview) -> None:
        start, stop = self._pos, self._pos + len(view)
        while self._next < len(self._floats):
            lo, hi, dtype, name = self._floats[self._next]
            if lo >= stop:
                return
            a, b = max(lo, start), min(hi, stop)
            piece = view[a - start : b - start]
            size = dtype.itemsize
            if self._carry:
                need = size - len(self._carry)
                self._carry += bytes(piece[:need])
                piece = piece[need:]
                if len(self._carry) == size:
                    if has_nonfinite(memoryview(self._carry), dtype):
                        self.nonfinite = name
                        return
                    self._carry = b""
            usable = len(piece) - len(piece) % size
            if usable and has_nonfinite(piece[:usable], dtype):
                self.nonfinite = name
                return
            if usable < len(piece):
                self._carry = bytes(piece[usable:])
            if hi > stop:
                return
            self._next += 1

    def close(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def digest(self) -> str:
        """The sha256 of what was fed so far (waits for the helper thread)."""
        self.close()
        return self._sha.hexdigest()

    def finish(self) -> str:
        """Check length, digest and finiteness; return the data digest."""
        digest = self.digest()
        expected = self.header.data_size
        if self._pos < expected:
            raise PacketFormatError(
                "truncated", f"the data section has {self._pos} bytes; the header describes {expected}"
            )
        if self._pos > expected:
            raise PacketFormatError("trailing_bytes", f"{self._pos - expected} bytes follow the last tensor")
        if digest != self.header.manifest.data_sha256:
            raise VerificationError(
                "digest_mismatch", "the tensor data does not match the signed digest (corrupted or tampered)"
            )
        if self.nonfinite is not None:
            raise VerificationError("non_finite", f"tensor {self.nonfinite!r} contains NaN or Inf")
        return digest

    def __enter__(self) -> DataChecker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_data(header: PacketHeader, chunks: Iterable[memoryview]) -> str:
    with DataChecker(header) as checker:
        for chunk in chunks:
            checker.update(chunk)
        return checker.finish()


def iter_file(f: Any, offset: int, length: int) -> Iterator[memoryview]:
    """Read ``length`` bytes from ``offset`` into two alternating buffers (see DataChecker)."""
    buffers = [bytearray(min(CHUNK, max(length, 1))) for _ in range(2)]
    f.seek(offset)
    i = 0
    while length > 0:
        buf = buffers[i % 2]
        n = f.readinto(memoryview(buf)[: min(len(buf), length)])
        if not n:
            return
        yield memoryview(buf)[:n]
        length -= n
        i += 1


def iter_buffer(view: memoryview, offset: int, length: int) -> Iterator[memoryview]:
    for start in range(offset, offset + length, CHUNK):
        yield view[start : min(start + CHUNK, offset + length)]
