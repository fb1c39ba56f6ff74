"""Checking a packet as its bytes arrive (a download, an upload): one pass, nothing buffered."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from m2kt.errors import PacketFormatError, VerificationError
from m2kt.format.checker import THREAD_MIN_BYTES, DataChecker
from m2kt.format.header import DEFAULT_LIMITS, PacketHeader, ReadLimits, parse_header

__all__ = ["StreamResult", "StreamVerifier"]


class _BackgroundSha256:
    """sha256 fed from a helper thread; a buffer must stay unchanged until the next update() returns.

    Pieces under ``INLINE`` bytes are hashed in the caller's thread (a small packet never starts the
    helper: starting a thread costs more than hashing a few KiB)."""

    INLINE = 64 << 10

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    def update(self, view: memoryview) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        if len(view) < self.INLINE:
            self._sha.update(view)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="m2kt-sha256")
        self._pending = self._pool.submit(self._sha.update, view)

    def hexdigest(self) -> str:
        self.close()
        return self._sha.hexdigest()

    def close(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)


@dataclass(frozen=True)
class StreamResult:
    packet_id: str  # sha256 of every byte fed
    size: int
    header: PacketHeader
    data_sha256: str


class StreamVerifier:
    """Check a packet as its bytes arrive (a download, an upload) — one pass, nothing buffered.

    The header is parsed as soon as it is complete (:meth:`feed` returns it then, so the caller can
    check the signature before the body has arrived); the whole-file sha256 (the packet id) and the
    data section's digest and finiteness are computed on the way, in helper threads. A buffer passed
    to :meth:`feed` must stay unchanged until the following ``feed`` or ``finish`` returns.
    """

    def __init__(
        self,
        *,
        limits: ReadLimits = DEFAULT_LIMITS,
        expected_id: str | None = None,
        on_data: Callable[[int, memoryview], None] | None = None,
    ) -> None:
        """``on_data(offset, piece)`` sees every piece of the data section with its offset in it."""
        self.limits = limits
        self.expected_id = expected_id
        self.on_data = on_data
        self.size = 0
        self.header: PacketHeader | None = None
        self.header_sha256: str | None = None  # of the length prefix and the header, once parsed
        self._file_sha = _BackgroundSha256()
        self._prefix = bytearray()
        self._checker: DataChecker | None = None

    def feed(self, chunk: bytes | bytearray | memoryview) -> PacketHeader | None:
        """Consume the next bytes; returns the header on the call that completes it."""
        view = memoryview(chunk).cast("B")
        if not len(view):
            return None
        self.size += len(view)
        self._file_sha.update(view)
        if self._checker is not None:
            self._data(view)
            return None
        self._prefix += view
        if len(self._prefix) < 8:
            return None
        (n,) = struct.unpack_from("<Q", self._prefix, 0)
        if n > self.limits.max_header_bytes:
            parse_header(bytes(self._prefix[:8]), limits=self.limits)  # raises header_too_large
        if len(self._prefix) < 8 + n:
            return None
        head = bytes(self._prefix[: 8 + n])
        header = parse_header(head, limits=self.limits)
        self.header = header
        self.header_sha256 = hashlib.sha256(head).hexdigest()
        self._checker = DataChecker(header, threaded=header.data_size >= THREAD_MIN_BYTES)
        rest = bytes(self._prefix[8 + n :])
        self._prefix = bytearray()
        if rest:
            self._data(memoryview(rest))
        return header

    def _data(self, view: memoryview) -> None:
        assert self._checker is not None
        if self.on_data is not None:
            self.on_data(self._checker.position, view)
        self._checker.update(view)

    def finish(self) -> StreamResult:
        """Raise PacketError unless the bytes were one complete, intact packet (and the expected one)."""
        try:
            if self.header is None or self._checker is None:
                parse_header(bytes(self._prefix), limits=self.limits)  # raises: truncated / out of bounds
                raise PacketFormatError("truncated", "the stream ended inside the header")  # pragma: no cover
            data_digest = self._checker.finish()
            packet_id = self._file_sha.hexdigest()
        finally:
            self.close()
        if self.expected_id is not None and packet_id != self.expected_id:
            raise VerificationError(
                "id_mismatch", f"received packet {packet_id[:16]}…, not the requested {self.expected_id[:16]}…"
            )
        return StreamResult(packet_id, self.size, self.header, data_digest)

    def close(self) -> None:
        self._file_sha.close()
        if self._checker is not None:
            self._checker.close()
