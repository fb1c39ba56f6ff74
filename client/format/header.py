"""The packet header: the 8-byte length prefix and the canonical JSON it announces, parsed within bounds.

``[8 bytes: N, little-endian u64][N bytes: header JSON, space-padded to 8][data section]``. The header maps
tensor names to ``{"dtype", "shape", "data_offsets"}`` and carries ``__metadata__`` =
``{"m2kt.manifest": <canonical JSON>, "m2kt.signature": <base64 Ed25519>}``. A header is accepted only in
the one canonical form :func:`m2kt.format.writer.write_packet` produces, so re-formatting it cannot vary a
packet's id. Nothing is allocated by what a header claims before its bounds are checked.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from m2kt.errors import PacketFormatError
from m2kt.format.dtypes import DTYPES
from m2kt.format.keys import SIGNATURE_BYTES
from m2kt.format.manifest import Manifest, TensorSpec, canonical_json

__all__ = [
    "DEFAULT_LIMITS",
    "MANIFEST_KEY",
    "MAX_TENSOR_BYTES",
    "PACKET_SUFFIX",
    "SIGNATURE_KEY",
    "PacketHeader",
    "ReadLimits",
    "first_error",
    "encode_header",
    "layout",
    "parse_header",
    "read_header",
    "read_header_from",
    "shape_nbytes",
]

PACKET_SUFFIX = ".m2kt"
MANIFEST_KEY = "m2kt.manifest"
SIGNATURE_KEY = "m2kt.signature"
#: The most bytes a tensor's shape may describe, its zero dimensions left out: numpy's limit (an
#: ``intp``), which is within safetensors' (a ``u64``). An empty tensor is bound by it too.
MAX_TENSOR_BYTES = 2**63 - 1


@dataclass(frozen=True)
class ReadLimits:
    """Bounds applied before anything is allocated for a packet."""

    max_header_bytes: int = 4 << 20
    max_json_containers: int = 200_000
    max_tensors: int = 256
    max_ndim: int = 8
    max_data_bytes: int | None = None
    max_manifest_bytes: int | None = None  # bytes of the signed manifest JSON string


DEFAULT_LIMITS = ReadLimits()


@dataclass(frozen=True)
class PacketHeader:
    """Everything in a packet except the tensor bytes: parsed, bounded and cross-checked."""

    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes
    tensors: tuple[TensorSpec, ...]  # in data-section order
    header_size: int  # N, the header JSON length including padding

    @property
    def data_offset(self) -> int:
        return 8 + self.header_size

    @property
    def data_size(self) -> int:
        return self.tensors[-1].data_offsets[1] if self.tensors else 0

    @property
    def file_size(self) -> int:
        return self.data_offset + self.data_size


def layout(shapes: Mapping[str, tuple[str, tuple[int, ...]]]) -> list[TensorSpec]:
    """Canonical data layout: descending item size, then name; contiguous from offset 0."""
    order = sorted(shapes, key=lambda n: (-DTYPES[shapes[n][0]].itemsize, n))
    specs, offset = [], 0
    for name in order:
        code, shape = shapes[name]
        nbytes = int(np.prod(shape, dtype=object)) * DTYPES[code].itemsize
        specs.append(TensorSpec(name=name, dtype=code, shape=list(shape), data_offsets=(offset, offset + nbytes)))  # type: ignore[arg-type]
        offset += nbytes
    return specs


def encode_header(manifest_bytes: bytes, signature: bytes, tensors: Iterable[TensorSpec]) -> bytes:
    """The canonical header JSON (without the length prefix), space-padded to a multiple of 8."""
    doc: dict[str, Any] = {
        "__metadata__": {
            MANIFEST_KEY: manifest_bytes.decode("utf-8"),
            SIGNATURE_KEY: base64.b64encode(signature).decode("ascii"),
        }
    }
    for t in tensors:
        doc[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": list(t.data_offsets)}
    raw = canonical_json(doc)
    return raw + b" " * (-(8 + len(raw)) % 8)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise PacketFormatError("header_duplicate_key", f"the header names {k[:80]!r} twice")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise PacketFormatError("header_not_json", f"the header contains {name}, which JSON does not allow")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def shape_nbytes(dtype: str, shape: list[int]) -> int | None:
    """The bytes a ``dtype`` tensor of ``shape`` (non-negative ints) holds, or None for a shape no reader can hold.

    A zero dimension makes a tensor empty, but numpy still multiplies the other dimensions to size
    the array (refusing one whose product times the item size passes ``2**63 - 1``), and safetensors
    multiplies the dimensions left to right in a u64 before it sees the zero. So the product of the
    non-zero dimensions times the item size must stay within :data:`MAX_TENSOR_BYTES`, empty tensor or
    not; that bounds every dimension and every running product too. It is checked as the product
    grows, so a hostile shape costs at most ``max_ndim`` multiplications of small numbers.
    """
    held = DTYPES[dtype].itemsize  # the product of the non-zero dimensions so far, times the item size
    for d in shape:
        if d:
            held *= d
            if held > MAX_TENSOR_BYTES:
                return None
    return 0 if 0 in shape else held


def _parse_tensor_entry(name: str, entry: Any, limits: ReadLimits) -> TensorSpec:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise PacketFormatError(
            "bad_tensor_entry", f"tensor {name[:80]!r} must have exactly dtype, shape and data_offsets"
        )
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise PacketFormatError(
            "unknown_dtype", f"tensor {name[:80]!r} has dtype {str(dtype)[:20]!r}; allowed: {sorted(DTYPES)}"
        )
    shape = entry["shape"]
    if not isinstance(shape, list) or len(shape) > limits.max_ndim or not all(_is_int(d) and d >= 0 for d in shape):
        raise PacketFormatError(
            "bad_shape", f"tensor {name[:80]!r}: shape must be at most {limits.max_ndim} non-negative integers"
        )
    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise PacketFormatError("bad_offsets", f"tensor {name[:80]!r}: data_offsets must be two non-negative integers")
    begin, end = offsets
    span, nbytes = end - begin, shape_nbytes(dtype, shape)
    # Offsets that disagree with the shape first, then a shape that agrees with them but that no
    # reader can hold. A non-empty shape past the limit needs more bytes than any span within it.
    if nbytes is not None:
        disagree = span != nbytes
    else:
        disagree = 0 not in shape and span <= MAX_TENSOR_BYTES
    if disagree:
        needs = nbytes if nbytes is not None else f"more than {MAX_TENSOR_BYTES}"
        raise PacketFormatError(
            "bad_offsets",
            f"tensor {name[:80]!r}: offsets span {span} bytes but {dtype}{str(shape)[:120]} needs {needs}",
        )
    if nbytes is None:
        raise PacketFormatError(
            "bad_shape",
            f"tensor {name[:80]!r}: shape {str(shape)[:120]} describes more than {MAX_TENSOR_BYTES} bytes of "
            f"{dtype}, zero dimensions aside; no reader can hold it",
        )
    try:
        return TensorSpec.model_validate({"name": name, "dtype": dtype, "shape": shape, "data_offsets": (begin, end)})
    except ValidationError as exc:
        raise PacketFormatError("bad_tensor_entry", f"tensor {name[:80]!r}: {first_error(exc)}") from None


def first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"{where}: {err.get('msg')}" if where else str(err.get("msg"))


def parse_header(
    data: bytes | bytearray | memoryview,
    *,
    file_size: int | None = None,
    limits: ReadLimits = DEFAULT_LIMITS,
) -> PacketHeader:
    """Parse and cross-check a packet header from the file's first bytes.

    ``data`` must hold at least the 8-byte prefix and the N header bytes it announces (more is
    ignored). With ``file_size``, the data section's length is checked too.
    """
    view = memoryview(data)
    if len(view) < 8:
        raise PacketFormatError("truncated", f"{len(view)} bytes is too short for a packet (need at least 8)")
    (n,) = struct.unpack_from("<Q", view, 0)
    if n > limits.max_header_bytes:
        raise PacketFormatError(
            "header_too_large", f"the header claims {n} bytes; the limit is {limits.max_header_bytes}"
        )
    available = (file_size if file_size is not None else len(view)) - 8
    if n > available or n > len(view) - 8:
        raise PacketFormatError(
            "header_out_of_bounds",
            f"the header claims {n} bytes but only {max(available, 0)} follow the length prefix "
            "(truncated file or lying header length)",
        )
    raw = bytes(view[8 : 8 + n])
    if n % 8 or not raw.startswith(b"{"):
        raise PacketFormatError("header_not_json", "the header must be a JSON object padded to a multiple of 8 bytes")
    if raw.count(b"{") + raw.count(b"[") > limits.max_json_containers:
        raise PacketFormatError(
            "header_too_complex", f"the header nests more than {limits.max_json_containers} JSON containers"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PacketFormatError("header_not_utf8", f"the header is not UTF-8 (byte {exc.start})") from None
    try:
        doc = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except PacketFormatError:
        raise
    except (ValueError, RecursionError) as exc:
        raise PacketFormatError("header_not_json", f"the header is not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(doc, dict):
        raise PacketFormatError("header_not_json", "the header must be a JSON object")

    meta = doc.pop("__metadata__", None)
    if (
        not isinstance(meta, dict)
        or set(meta) != {MANIFEST_KEY, SIGNATURE_KEY}
        or not all(isinstance(v, str) for v in meta.values())
    ):
        raise PacketFormatError(
            "metadata_missing",
            f"__metadata__ must hold exactly the strings {MANIFEST_KEY!r} and {SIGNATURE_KEY!r}",
        )
    if limits.max_manifest_bytes is not None and len(meta[MANIFEST_KEY]) > limits.max_manifest_bytes:
        raise PacketFormatError(
            "manifest_too_large",
            f"the manifest is {len(meta[MANIFEST_KEY])} characters; the limit is {limits.max_manifest_bytes}",
        )
    if len(doc) > limits.max_tensors:
        raise PacketFormatError("too_many_tensors", f"{len(doc)} tensors; the limit is {limits.max_tensors}")
    tensors = sorted(
        (_parse_tensor_entry(name, entry, limits) for name, entry in doc.items()),
        # the canonical layout's order: by offset; empty tensors sharing one by item size, then name
        key=lambda t: (t.data_offsets, -DTYPES[t.dtype].itemsize, t.name),
    )
    expected_offset = 0
    for t in tensors:
        if t.data_offsets[0] != expected_offset:
            raise PacketFormatError(
                "bad_offsets",
                f"tensor {t.name[:80]!r} starts at {t.data_offsets[0]}, expected {expected_offset} "
                "(tensors must be contiguous, without gaps or overlaps)",
            )
        expected_offset = t.data_offsets[1]
    data_size = expected_offset
    if limits.max_data_bytes is not None and data_size > limits.max_data_bytes:
        raise PacketFormatError(
            "data_too_large", f"the tensors need {data_size} bytes; the limit is {limits.max_data_bytes}"
        )

    # Signature: canonical base64 of exactly 64 bytes (re-encoding must give the same text).
    sig_text = meta[SIGNATURE_KEY]
    try:
        signature = base64.b64decode(sig_text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeError):
        raise PacketFormatError("signature_malformed", "the signature is not base64") from None
    if len(signature) != SIGNATURE_BYTES or base64.b64encode(signature).decode("ascii") != sig_text:
        raise PacketFormatError(
            "signature_malformed", f"the signature must be canonical base64 of {SIGNATURE_BYTES} bytes"
        )

    # Manifest: valid, canonical, and describing exactly these tensors.
    try:
        manifest_bytes = meta[MANIFEST_KEY].encode("utf-8")
    except UnicodeError:
        raise PacketFormatError("manifest_invalid", "the manifest is not valid UTF-8 text") from None
    try:
        manifest = Manifest.model_validate_json(manifest_bytes)
    except ValidationError as exc:
        raise PacketFormatError(
            "manifest_invalid", f"the manifest does not match the schema: {first_error(exc)}"
        ) from None
    try:
        canonical = manifest.to_bytes()
    except (UnicodeError, ValueError):
        raise PacketFormatError("manifest_invalid", "the manifest holds text that cannot be encoded") from None
    if canonical != manifest_bytes:
        raise PacketFormatError("manifest_not_canonical", "the manifest is not canonical JSON (sorted keys, no spaces)")
    if list(manifest.tensors) != tensors:
        raise PacketFormatError(
            "tensor_table_mismatch",
            "the header's tensor names, dtypes, shapes or offsets differ from the signed manifest",
        )
    if encode_header(manifest_bytes, signature, tensors) != raw:
        raise PacketFormatError(
            "header_not_canonical", "the header is not in canonical form (key order, spacing, layout or padding)"
        )

    header = PacketHeader(manifest, manifest_bytes, signature, tuple(tensors), n)
    if file_size is not None:
        if file_size < header.file_size:
            raise PacketFormatError(
                "truncated", f"the file has {file_size} bytes; the header describes {header.file_size}"
            )
        if file_size > header.file_size:
            raise PacketFormatError(
                "trailing_bytes",
                f"{file_size - header.file_size} bytes follow the last tensor "
                f"(the header describes {header.file_size})",
            )
    return header


def read_header(path: str | os.PathLike[str], *, limits: ReadLimits = DEFAULT_LIMITS) -> PacketHeader:
    """Parse a packet file's header without touching its tensor bytes."""
    with open(path, "rb") as f:
        return read_header_from(f, os.fstat(f.fileno()).st_size, limits)


def read_header_from(f: Any, file_size: int, limits: ReadLimits) -> PacketHeader:
    prefix = f.read(8)
    if len(prefix) < 8:
        return parse_header(prefix, file_size=file_size, limits=limits)
    (n,) = struct.unpack("<Q", prefix)
    body = f.read(min(n, limits.max_header_bytes, max(file_size - 8, 0)))
    return parse_header(prefix + body, file_size=file_size, limits=limits)
