"""Writing a packet: sign a manifest body over tensors and stream the file to disk, atomically."""

from __future__ import annotations

import os
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from m2kt.errors import VerificationError
from m2kt.format.checker import CHUNK, DataChecker
from m2kt.format.dtypes import dtype_code
from m2kt.format.header import PacketHeader, encode_header, first_error, layout
from m2kt.format.keys import SIGNATURE_BYTES, SigningKey
from m2kt.format.manifest import Manifest, ManifestBody
from m2kt.format.verifier import packet_id

__all__ = ["WrittenPacket", "write_packet"]


@dataclass(frozen=True)
class WrittenPacket:
    path: Path
    header: PacketHeader
    size: int = field(default=0)

    @property
    def manifest(self) -> Manifest:
        return self.header.manifest

    @property
    def id(self) -> str:
        """The packet id (reads the file once to hash it)."""
        return packet_id(self.path)


def _as_little_endian(array: np.ndarray) -> np.ndarray:
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array if array.flags.c_contiguous else array.copy(order="C")  # (ascontiguousarray turns 0-d into 1-d)


def write_packet(
    path: str | os.PathLike[str],
    body: ManifestBody,
    tensors: Mapping[str, np.ndarray],
    key: SigningKey,
) -> WrittenPacket:
    """Sign ``body`` over ``tensors`` and stream the packet to ``path`` (atomically).

    The data section is written and hashed in one pass: the header's size is fixed in advance
    (digest and signature have fixed lengths), so the header is written last, into the space
    reserved for it. A failure leaves nothing at ``path``.
    """
    arrays = {name: _as_little_endian(np.asarray(a)) for name, a in tensors.items()}
    specs = layout({name: (dtype_code(a), tuple(a.shape)) for name, a in arrays.items()})
    fields = body.model_dump()

    def manifest_for(digest: str) -> Manifest:
        try:
            return Manifest(**fields, tensors=specs, data_sha256=digest, key_fingerprint=key.fingerprint)
        except ValidationError as exc:
            raise VerificationError("manifest_invalid", first_error(exc)) from None

    draft = manifest_for("0" * 64)
    reserved = len(encode_header(draft.to_bytes(), bytes(SIGNATURE_BYTES), specs))
    draft_header = PacketHeader(draft, draft.to_bytes(), bytes(SIGNATURE_BYTES), tuple(specs), reserved)

    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(bytes(8 + reserved))
            with DataChecker(draft_header) as checker:  # hashes in a helper thread while we write
                for spec in specs:
                    flat = arrays[spec.name].reshape(-1).view(np.uint8)
                    for start in range(0, flat.size, CHUNK):
                        chunk = flat[start : start + CHUNK].data
                        checker.update(chunk)
                        f.write(chunk)
                digest = checker.digest()
                if checker.nonfinite is not None:
                    raise VerificationError(
                        "non_finite", f"tensor {checker.nonfinite!r} contains NaN or Inf; a packet must not"
                    )
            manifest = manifest_for(digest)
            manifest_bytes = manifest.to_bytes()
            signature = key.sign(manifest_bytes)
            header_json = encode_header(manifest_bytes, signature, specs)
            if len(header_json) != reserved:  # pragma: no cover - guards the fixed-length argument above
                raise RuntimeError("header size changed while signing")
            f.seek(0)
            f.write(struct.pack("<Q", reserved) + header_json)
            f.flush()
            os.fsync(f.fileno())
            size = os.fstat(f.fileno()).st_size
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    header = PacketHeader(manifest, manifest_bytes, signature, tuple(specs), reserved)
    return WrittenPacket(target, header, size)
