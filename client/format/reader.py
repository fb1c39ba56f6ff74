"""Opening a packet for reading: zero-copy, read-only numpy views of its tensors over a memory map."""

from __future__ import annotations

import mmap
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from m2kt.errors import PacketFormatError
from m2kt.format.checker import check_data, iter_buffer, iter_file
from m2kt.format.dtypes import DTYPES
from m2kt.format.header import DEFAULT_LIMITS, PacketHeader, ReadLimits, parse_header, read_header_from
from m2kt.format.manifest import Manifest
from m2kt.format.signature import KeyLookup, verify_signature
from m2kt.format.verifier import VerifiedPacket

__all__ = ["Packet", "open_packet"]


class Packet:
    """An opened packet: the parsed header and zero-copy, read-only numpy views of its tensors.

    Opening checks structure only; call :meth:`verify` (or use :func:`verify_packet`) before
    trusting the contents.

    >>> with open_packet("k.m2kt") as packet:          # doctest: +SKIP
    ...     packet.verify(trusted_key)
    ...     concepts = packet.tensors["concepts"]       # (K, d_T), backed by the file's pages
    """

    def __init__(
        self, header: PacketHeader, buffer: memoryview, *, path: Path | None = None, file: Any = None, owner: Any = None
    ) -> None:
        self.header = header
        self.path = path
        self._buffer = buffer
        self._file = file  # the open file the map was made from (verification reads the same inode)
        self._owner = owner  # the mmap, when file-backed
        self._views: dict[str, np.ndarray] = {}

    @property
    def manifest(self) -> Manifest:
        return self.header.manifest

    @property
    def size(self) -> int:
        return self.header.file_size

    @property
    def tensors(self) -> Mapping[str, np.ndarray]:
        """All tensors by name, as read-only views (nothing is copied)."""
        return {t.name: self.tensor(t.name) for t in self.header.tensors}

    def tensor(self, name: str) -> np.ndarray:
        if name not in self._views:
            spec = next((t for t in self.header.tensors if t.name == name), None)
            if spec is None:
                raise KeyError(f"the packet has no tensor {name!r}; it has {[t.name for t in self.header.tensors]}")
            dtype = DTYPES[spec.dtype].numpy
            count = (spec.data_offsets[1] - spec.data_offsets[0]) // dtype.itemsize
            try:  # parse_header admits only shapes numpy can hold (shape_nbytes); this keeps it a PacketError
                if count == 0:
                    arr = np.empty(tuple(spec.shape), dtype)
                else:
                    arr = np.frombuffer(
                        self._buffer, dtype, count=count, offset=self.header.data_offset + spec.data_offsets[0]
                    ).reshape(tuple(spec.shape))
            except (ValueError, OverflowError) as exc:  # pragma: no cover - guarded by the header's checks
                raise PacketFormatError("bad_shape", f"tensor {name[:80]!r}: {str(exc)[:200]}") from None
            arr.flags.writeable = False
            self._views[name] = arr
        return self._views[name]

    def verify(self, keys: KeyLookup) -> VerifiedPacket:
        """Check signature, digest and finiteness of this packet's bytes."""
        key = verify_signature(self.header, keys)
        if self._file is not None:
            # Read through the file that was mapped (not the path, which may have been replaced
            # since), and not through the map, so verifying does not fault every page in.
            if os.fstat(self._file.fileno()).st_size != self.header.file_size:
                raise PacketFormatError("truncated", "the file changed size since it was opened")
            chunks = iter_file(self._file, self.header.data_offset, self.header.data_size)
            digest = check_data(self.header, chunks)
        else:
            digest = check_data(self.header, iter_buffer(self._buffer, self.header.data_offset, self.header.data_size))
        return VerifiedPacket(self.header, key, digest)

    def close(self) -> None:
        self._views.clear()
        self._buffer = memoryview(b"")
        if isinstance(self._owner, mmap.mmap):
            try:
                self._owner.close()
            except BufferError:
                pass  # views handed to the caller still use it; it closes when they are gone
        self._owner = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Packet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        m = self.manifest
        return f"Packet(topic={m.topic!r}, concepts={len(m.concepts)}, bytes={self.size})"


def open_packet(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview,
    *,
    limits: ReadLimits = DEFAULT_LIMITS,
) -> Packet:
    """Open a packet file (memory-mapped) or buffer; checks structure, not signature or digest."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source).cast("B")
        return Packet(parse_header(view, file_size=len(view), limits=limits), view, path=None)
    path = Path(source)
    f = open(path, "rb", buffering=0)  # noqa: SIM115 - owned by the Packet, closed by Packet.close
    try:
        size = os.fstat(f.fileno()).st_size
        header = read_header_from(f, size, limits)
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except BaseException:
        f.close()
        raise
    return Packet(header, memoryview(mapped), path=path, file=f, owner=mapped)
