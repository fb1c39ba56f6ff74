"""Upload checks: structure, digest, signature, key status, topic, safety policy.

:class:`StreamingPacket` consumes an upload in chunks exactly once: it parses the header as
soon as its bytes are in (so a bad signature or unknown key is refused after a few KiB, not
after the whole body), then hashes the whole file (the packet id) and the data section (the
signed digest) — the latter in a helper thread, so the two run side by side — checks floats
are finite, and keeps a copy of the ``concepts`` tensor — the only tensor the broker's own
safety check reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from m2kt.broker.errors import TooLarge, ValidationFailed, from_packet_error
from m2kt.format import DTYPES, PacketError, PacketHeader, ReadLimits, StreamVerifier, verify_signature
from m2kt.format.keys import VerifyKey


@dataclass
class Received:
    packet_id: str
    size: int
    header: PacketHeader
    concepts: np.ndarray  # (K, d_T) float64, a private copy holding the packet's values exactly


class StreamingPacket:
    """Feed upload bytes in order; the header is available as soon as it has arrived.

    The packet checks are :class:`m2kt.format.stream.StreamVerifier`'s; this adds the broker's size
    limits, keeps the ``concepts`` bytes for the safety check, and turns refusals into 4xx errors.
    A chunk may still be hashed in a helper thread after feed() returns: it must stay unchanged
    until the next feed(), finish() or close() returns (``bytes`` always do).
    """

    def __init__(
        self,
        *,
        max_packet_bytes: int,
        max_header_bytes: int,
        max_concepts_bytes: int,
        max_tensors: int = ReadLimits.max_tensors,
        max_manifest_bytes: int | None = None,
    ) -> None:
        self.max_packet_bytes = max_packet_bytes
        self.max_concepts_bytes = max_concepts_bytes
        limits = ReadLimits(
            max_header_bytes=max_header_bytes,
            max_data_bytes=max_packet_bytes,
            max_tensors=max_tensors,
            max_manifest_bytes=max_manifest_bytes,
        )
        self._stream = StreamVerifier(limits=limits, on_data=self._capture)
        self._concepts = bytearray()
        self._concepts_range = (0, 0)

    @property
    def size(self) -> int:
        return self._stream.size

    @property
    def header(self) -> PacketHeader | None:
        return self._stream.header

    @property
    def header_sha256(self) -> str | None:
        """sha256 of the 8-byte length prefix and the header, once parsed."""
        return self._stream.header_sha256

    def feed(self, chunk: bytes | memoryview) -> PacketHeader | None:
        """Consume a chunk; returns the header on the call that completes it, else None."""
        if self.size + len(chunk) > self.max_packet_bytes:
            raise TooLarge(
                f"the packet exceeds the broker's limit of {self.max_packet_bytes} bytes", code="packet_too_large"
            )
        try:
            header = self._stream.feed(chunk)
        except PacketError as exc:
            raise from_packet_error(exc) from None
        if header is not None:
            if header.file_size > self.max_packet_bytes:
                raise TooLarge(
                    f"the packet declares {header.file_size} bytes; the broker's limit is {self.max_packet_bytes}",
                    code="packet_too_large",
                )
        return header

    def _capture(self, offset: int, piece: memoryview) -> None:
        """Keep the bytes of the ``concepts`` tensor (StreamVerifier calls this for each data piece)."""
        if offset == 0:
            assert self.header is not None
            spec = next(t for t in self.header.tensors if t.name == "concepts")
            size = spec.data_offsets[1] - spec.data_offsets[0]
            if size > self.max_concepts_bytes:
                raise TooLarge(
                    f"the concepts tensor has {size} bytes; the broker checks at most {self.max_concepts_bytes}",
                    code="concepts_too_large",
                )
            self._concepts_range = spec.data_offsets
        lo, hi = self._concepts_range
        a, b = max(lo, offset), min(hi, offset + len(piece))
        if a < b:
            self._concepts += piece[a - offset : b - offset]

    def finish(self) -> Received:
        """Check the body is complete, the digest matches and floats are finite."""
        try:
            result = self._stream.finish()
        except PacketError as exc:
            raise from_packet_error(exc) from None
        spec = next(t for t in result.header.tensors if t.name == "concepts")
        concepts = np.frombuffer(bytes(self._concepts), DTYPES[spec.dtype].numpy).reshape(tuple(spec.shape))
        # float64 holds every F64/F32/F16/BF16 value exactly: no row is turned into inf or 0 here
        return Received(result.packet_id, result.size, result.header, concepts.astype(np.float64))

    def close(self) -> None:
        self._stream.close()


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


def unit_rows(array: np.ndarray) -> np.ndarray:
    """The rows of a 2-D ``array`` scaled to unit length, in float64, for any finite values of any float dtype.

    Each row is first divided by its largest magnitude (so its entries lie in [-1, 1] and one is ±1),
    then by its length (between 1 and sqrt(d)): nothing overflows or underflows, whether the row's
    values are near float64's largest (1e308) or among its subnormals, and the result is the row's
    own direction to float64 precision. A row of zeros has no direction and stays zeros; so does a row
    holding NaN or Inf (callers refuse those first). The result never holds NaN or Inf.
    """
    rows = np.array(array, dtype=np.float64, copy=True, ndmin=2)  # exact for F64, F32, F16 and BF16 values
    if rows.ndim != 2:
        raise ValueError(f"unit_rows wants a 2-D array (rows of vectors), not shape {rows.shape}")
    rows[~np.isfinite(rows).all(axis=1)] = 0.0
    scale = np.abs(rows).max(axis=1, keepdims=True, initial=0.0)
    rows /= np.where(scale > 0, scale, 1.0)
    length = np.sqrt(np.einsum("ij,ij->i", rows, rows))[:, None]
    rows /= np.where(length > 0, length, 1.0)
    return rows


def flagged_similarity(
    report: SafetyReport, header: PacketHeader, concepts: np.ndarray, sets: list[FlaggedSet]
) -> None:
    """The broker's own check: cosine of every concept against admin-flagged directions.

    Computed in float64 from each row's own values (:func:`unit_rows`), so a concept row that is a
    scaled copy of a flagged direction — by 1e300 or 1e-300, in any float dtype a packet may carry —
    has cosine 1 with it, not the NaN or 0 a float32 cast would give. A row of zeros has no
    direction: its cosine with everything is 0. A row holding NaN or Inf is refused as
    ``non_finite`` (the data check refuses such packets before this runs).
    """
    if not np.isfinite(np.asarray(concepts, dtype=np.float64)).all():
        raise ValidationFailed("the concepts tensor contains NaN or Inf", code="non_finite")
    unit = unit_rows(concepts)
    ids = [c.id for c in header.manifest.concepts]
    for s in sets:
        directions = unit_rows(s.directions)  # unit rows already, unless a caller's normalising lost them
        if directions.shape[1] != unit.shape[1]:
            continue
        sims = np.clip(unit @ directions.T, -1.0, 1.0)  # (K, F); finite: every row is unit or zero
        for k, f in zip(*np.nonzero(sims >= s.threshold), strict=True):
            report.flagged.append(
                {"concept": ids[k], "set": s.name, "label": s.labels[f], "similarity": round(float(sims[k, f]), 6)}
            )
