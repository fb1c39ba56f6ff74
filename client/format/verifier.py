"""Verifying a packet file or buffer in full, and a packet's id (the sha256 of the whole file).

Verification runs, cheapest first: header bounds and limits, JSON, dtypes, shapes and offsets → the
manifest parses, is canonical and its tensor table equals the header's → the signature verifies with
the trusted key the manifest's fingerprint names → one pass over the data: its sha256 equals
``data_sha256`` and no float tensor holds NaN or Inf.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass

from m2kt.format.checker import check_data, iter_buffer, iter_file
from m2kt.format.header import DEFAULT_LIMITS, PacketHeader, ReadLimits, parse_header, read_header_from
from m2kt.format.keys import VerifyKey
from m2kt.format.manifest import Manifest
from m2kt.format.signature import KeyLookup, verify_signature

__all__ = ["VerifiedPacket", "packet_id", "verify_packet"]


@dataclass(frozen=True)
class VerifiedPacket:
    header: PacketHeader
    key: VerifyKey
    data_sha256: str

    @property
    def manifest(self) -> Manifest:
        return self.header.manifest


def verify_packet(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview,
    keys: KeyLookup,
    *,
    limits: ReadLimits = DEFAULT_LIMITS,
) -> VerifiedPacket:
    """Fully verify a packet file or buffer against trusted keys (see the module docstring)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source).cast("B")
        header = parse_header(view, file_size=len(view), limits=limits)
        key = verify_signature(header, keys)
        chunks: Iterable[memoryview] = iter_buffer(view, header.data_offset, header.data_size)
        return VerifiedPacket(header, key, check_data(header, chunks))
    with open(source, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        header = read_header_from(f, size, limits)
        key = verify_signature(header, keys)
        digest = check_data(header, iter_file(f, header.data_offset, header.data_size))
    return VerifiedPacket(header, key, digest)


def packet_id(source: str | os.PathLike[str] | bytes | bytearray | memoryview) -> str:
    """A packet's id: the sha256 of the whole file."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return hashlib.sha256(source).hexdigest()
    h = hashlib.sha256()
    with open(source, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        for chunk in iter_file(f, 0, size):
            h.update(chunk)
    return h.hexdigest()
