"""Upload checks: structure, digest, signature, key status, topic, safety policy.

:class:`StreamingPacket` consumes an upload in chunks exactly once: it parses the header as
soon as its bytes are in (so a bad signature or unknown key is refused after a few KiB, not
after the whole body), then hashes the whole file (the packet id) and the data section (the
signed digest) — the latter in a helper thread, so the two run side by side — checks floats
are finite, and keeps a copy of the ``concepts`` tensor — the only tensor the broker's own
safety check reads.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

import numpy as np

from broker.errors import BrokerError, TooLarge, ValidationFailed, from_packet_error
from client.keys import VerifyKey
from client.packet import DTYPES, DataChecker, PacketError, PacketHeader, ReadLimits, parse_header, verify_signature


@dataclass
class Received:
    packet_id: str
    size: int
    header: PacketHeader
    concepts: np.ndarray  # (K, d_T) float32, a private copy


class StreamingPacket:
    """Feed upload bytes in order; the header is available as soon as it has arrived."""

    def __init__(self, *, max_packet_bytes: int, max_header_bytes: int, max_concepts_bytes: int) -> None:
        self.max_packet_bytes = max_packet_bytes
        self.max_concepts_bytes = max_concepts_bytes
        self.limits = ReadLimits(max_header_bytes=max_header_bytes, max_data_bytes=max_packet_bytes)
        self.size = 0
        self.header: PacketHeader | None = None
        self.header_sha256: str | None = None  # of the 8-byte length prefix and the header, once parsed
        self._file_sha = hashlib.sha256()
        self._prefix = bytearray()
        self._checker: DataChecker | None = None
        self._concepts: bytearray | None = None
        self._concepts_range = (0, 0)

    def feed(self, chunk: bytes | memoryview) -> PacketHeader | None:
        """Consume a chunk; returns the header on the call that completes it, else None.

        The data section is hashed in a helper thread that may still read ``chunk`` after this returns:
        it must stay unchanged until the next feed(), finish() or close() returns (``bytes`` always do).
        """
        view = memoryview(chunk).cast("B")
        self.size += len(view)
        if self.size > self.max_packet_bytes:
            raise TooLarge(
                f"the packet exceeds the broker's limit of {self.max_packet_bytes} bytes", code="packet_too_large"
            )
        self._file_sha.update(view)
        if self.header is not None:
            self._data(view)
            return None
        self._prefix += view
        if len(self._prefix) < 8:
            return None
        (n,) = struct.unpack_from("<Q", self._prefix, 0)
        if n > self.limits.max_header_bytes:
            raise self._header_error()
        if len(self._prefix) < 8 + n:
            return None
        head = bytes(self._prefix[: 8 + n])
        try:
            header = parse_header(head, file_size=None, limits=self.limits)
        except PacketError as exc:
            raise from_packet_error(exc) from None
        if header.file_size > self.max_packet_bytes:
            raise TooLarge(
                f"the packet declares {header.file_size} bytes; the broker's limit is {self.max_packet_bytes}",
                code="packet_too_large",
            )
        self.header = header
        self.header_sha256 = hashlib.sha256(head).hexdigest()
        self._start_data(header)
        rest = memoryview(self._prefix)[8 + n :]
        if len(rest):
            self._data(bytes(rest))
        self._prefix = bytearray()
        return header

    def _header_error(self) -> BrokerError:
        """The error parse_header gives for this length prefix (too large, before buffering it)."""
        try:
            parse_header(bytes(self._prefix[:8]), limits=self.limits)
        except PacketError as exc:
            return from_packet_error(exc)
        return ValidationFailed("the header was refused")  # pragma: no cover

    def _start_data(self, header: PacketHeader) -> None:
        # Threaded: the data digest runs beside the file digest (feed() hands it immutable chunks).
        self._checker = DataChecker(header, threaded=True)
        spec = next(t for t in header.tensors if t.name == "concepts")
        size = spec.data_offsets[1] - spec.data_offsets[0]
        if size > self.max_concepts_bytes:
            raise TooLarge(
                f"the concepts tensor has {size} bytes; the broker checks at most {self.max_concepts_bytes}",
                code="concepts_too_large",
            )
        self._concepts = bytearray()
        self._concepts_range = spec.data_offsets

    def _data(self, view: bytes | memoryview) -> None:
        assert self._checker is not None and self._concepts is not None
        start = self._checker.position
        lo, hi = self._concepts_range
        a, b = max(lo, start), min(hi, start + len(view))
        if a < b:
            self._concepts += view[a - start : b - start]
        self._checker.update(view)

    def finish(self) -> Received:
        """Check the body is complete, the digest matches and floats are finite."""
        if self.header is None or self._checker is None:
            try:
                parse_header(bytes(self._prefix), limits=self.limits)
            except PacketError as exc:
                raise from_packet_error(exc) from None
            raise ValidationFailed("the upload ended inside the header", code="truncated")  # pragma: no cover
        try:
            self._checker.finish()
        except PacketError as exc:
            raise from_packet_error(exc) from None
        spec = next(t for t in self.header.tensors if t.name == "concepts")
        concepts = np.frombuffer(bytes(self._concepts or b""), DTYPES[spec.dtype].numpy).reshape(tuple(spec.shape))
        return Received(self._file_sha.hexdigest(), self.size, self.header, concepts.astype(np.float32))

    def close(self) -> None:
        if self._checker is not None:
            self._checker.close()


def check_signature(header: PacketHeader, key: VerifyKey) -> None:
    try:
        verify_signature(header, key)
    except PacketError as exc:
        raise from_packet_error(exc) from None


@dataclass
class FlaggedSet:
    name: str
    labels: list[str]
    directions: np.ndarray  # (F, d) unit rows
    threshold: float


@dataclass
class SafetyReport:
    threshold: float
    declared_max: float
    over_threshold: list[str] = field(default_factory=list)
    flagged: list[dict[str, object]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.over_threshold and not self.flagged


def declared_safety(header: PacketHeader, threshold: float) -> SafetyReport:
    """The teacher's own per-concept scores must be under the topic's threshold."""
    scores = [(c.id, c.safety_score) for c in header.manifest.concepts]
    return SafetyReport(
        threshold=threshold,
        declared_max=max(s for _, s in scores),
        over_threshold=[cid for cid, s in scores if s >= threshold],
    )


def flagged_similarity(
    report: SafetyReport, header: PacketHeader, concepts: np.ndarray, sets: list[FlaggedSet]
) -> None:
    """The broker's own check: cosine of every concept against admin-flagged directions."""
    norms = np.linalg.norm(concepts, axis=1, keepdims=True)
    unit = concepts / np.maximum(norms, 1e-12)
    ids = [c.id for c in header.manifest.concepts]
    for s in sets:
        if s.directions.shape[1] != concepts.shape[1]:
            continue
        sims = unit @ s.directions.T  # (K, F)
        for k, f in zip(*np.nonzero(sims >= s.threshold), strict=True):
            report.flagged.append(
                {"concept": ids[k], "set": s.name, "label": s.labels[f], "similarity": round(float(sims[k, f]), 6)}
            )
