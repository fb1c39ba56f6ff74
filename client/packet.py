"""The knowledge packet K = (C, A, R, M, σ) on disk and on the wire: build, sign, read, verify.

A packet is **one safetensors file** (suffix ``.m2kt``)::

    [8 bytes: N, little-endian u64][N bytes: header JSON, space-padded to 8][data section]

The header JSON maps tensor names to ``{"dtype", "shape", "data_offsets"}`` and carries
``__metadata__`` = ``{"m2kt.manifest": <canonical JSON>, "m2kt.signature": <base64 Ed25519>}``.
Any safetensors reader can open it; nothing is ever unpickled.

M2KT packets are *canonical*: the header is exactly what :func:`write_packet` produces for its
content (sorted keys, no spaces, tensors laid out by descending item size then name, padded
with spaces), and the manifest is canonical JSON. So the packet id — the sha256 of the whole
file — is a function of (manifest, signature, tensor bytes) and cannot be varied by
re-formatting a header.

Verification (:func:`verify_packet`, :meth:`Packet.verify`, and the incremental
:class:`DataChecker` the broker feeds while streaming) runs, cheapest first:

1. header bounds and limits, JSON, dtypes, shapes and offsets (contiguous, in bounds);
2. the manifest parses, is canonical, and its tensor table equals the header's;
3. the signature is canonical base64 of 64 bytes and verifies with the key the manifest's
   fingerprint names (from the caller's trusted keys);
4. one pass over the data section: its sha256 equals ``data_sha256`` and no float tensor
   holds NaN or Inf.

Every refusal is a :class:`PacketError` with a stable ``code``: :class:`PacketFormatError`
for a malformed file (the broker answers 400) and :class:`PacketVerificationError` for a
well-formed packet that fails a check (422).

Reading is zero-copy: :func:`open_packet` memory-maps a file (or wraps a buffer) and hands
out read-only numpy views. This module never imports torch.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import mmap
import os
import secrets
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import ml_dtypes
import numpy as np
from pydantic import ValidationError

from client.keys import SIGNATURE_BYTES, SigningKey, VerifyKey
from client.manifest import Manifest, ManifestBody, TensorSpec, canonical_json

__all__ = [
    "DTYPES",
    "PACKET_SUFFIX",
    "DataChecker",
    "KeyLookup",
    "Packet",
    "PacketError",
    "PacketFormatError",
    "PacketHeader",
    "PacketVerificationError",
    "ReadLimits",
    "StreamResult",
    "StreamVerifier",
    "VerifiedPacket",
    "WrittenPacket",
    "open_packet",
    "packet_id",
    "parse_header",
    "read_header",
    "verify_packet",
    "verify_signature",
    "write_packet",
]

PACKET_SUFFIX = ".m2kt"
MANIFEST_KEY = "m2kt.manifest"
SIGNATURE_KEY = "m2kt.signature"
_CHUNK = 8 << 20  # bytes per read/hash step; a power of two, so float elements never straddle chunks of a file
_THREAD_MIN_BYTES = 4 << 20  # below this, hashing in a helper thread costs more than it saves


# --------------------------------------------------------------------------- errors


class PacketError(ValueError):
    """A packet was refused. ``code`` is stable and machine-readable; the message is for people."""

    kind: Literal["malformed", "invalid"] = "invalid"

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


class PacketFormatError(PacketError):
    """The bytes are not a well-formed M2KT packet (structure, limits, encoding)."""

    kind = "malformed"


class PacketVerificationError(PacketError):
    """A well-formed packet failed a check: digest, signature, key, or tensor content."""

    kind = "invalid"


# --------------------------------------------------------------------------- dtypes


@dataclass(frozen=True)
class _DType:
    code: str
    numpy: np.dtype[Any]
    # For float types: the exponent mask, read through an unsigned view; all exponent bits set
    # means Inf or NaN. None for integer and bool types.
    exponent_mask: int | None = None

    @property
    def itemsize(self) -> int:
        return self.numpy.itemsize


DTYPES: dict[str, _DType] = {
    d.code: d
    for d in (
        _DType("F64", np.dtype("<f8"), 0x7FF0000000000000),
        _DType("F32", np.dtype("<f4"), 0x7F800000),
        _DType("F16", np.dtype("<f2"), 0x7C00),
        _DType("BF16", np.dtype(ml_dtypes.bfloat16), 0x7F80),
        _DType("I64", np.dtype("<i8")),
        _DType("I32", np.dtype("<i4")),
        _DType("I16", np.dtype("<i2")),
        _DType("I8", np.dtype("i1")),
        _DType("U8", np.dtype("u1")),
        _DType("BOOL", np.dtype("?")),
    )
}
_CODE_OF_NUMPY = {d.numpy: d.code for d in DTYPES.values()}


def _code_for(array: np.ndarray) -> str:
    dt = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    code = _CODE_OF_NUMPY.get(dt)
    if code is None:
        raise TypeError(f"dtype {array.dtype} cannot go into a packet; use one of {sorted(DTYPES)}")
    return code


def _has_nonfinite(buf: memoryview, dtype: _DType) -> bool:
    """True when the little-endian elements in ``buf`` include an Inf or NaN."""
    if dtype.code in ("F32", "F64"):
        return not bool(np.isfinite(np.frombuffer(buf, dtype.numpy)).all())
    bits = np.frombuffer(buf, np.dtype(f"<u{dtype.itemsize}"))
    mask = np.array(dtype.exponent_mask, bits.dtype)
    return bool(((bits & mask) == mask).any())


# --------------------------------------------------------------------------- header


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


def _layout(shapes: Mapping[str, tuple[str, tuple[int, ...]]]) -> list[TensorSpec]:
    """Canonical data layout: descending item size, then name; contiguous from offset 0."""
    order = sorted(shapes, key=lambda n: (-DTYPES[shapes[n][0]].itemsize, n))
    specs, offset = [], 0
    for name in order:
        code, shape = shapes[name]
        nbytes = int(np.prod(shape, dtype=object)) * DTYPES[code].itemsize
        specs.append(TensorSpec(name=name, dtype=code, shape=list(shape), data_offsets=(offset, offset + nbytes)))  # type: ignore[arg-type]
        offset += nbytes
    return specs


def _header_bytes(manifest_bytes: bytes, signature: bytes, tensors: Iterable[TensorSpec]) -> bytes:
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
    nbytes = 1
    for d in shape:
        nbytes *= d
    nbytes *= DTYPES[dtype].itemsize
    if end - begin != nbytes:
        raise PacketFormatError(
            "bad_offsets",
            f"tensor {name[:80]!r}: offsets span {end - begin} bytes but {dtype}{shape} needs {nbytes}",
        )
    try:
        return TensorSpec.model_validate({"name": name, "dtype": dtype, "shape": shape, "data_offsets": (begin, end)})
    except ValidationError as exc:
        raise PacketFormatError("bad_tensor_entry", f"tensor {name[:80]!r}: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
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
        key=lambda t: (t.data_offsets, t.name),
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
            "manifest_invalid", f"the manifest does not match the schema: {_first_error(exc)}"
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
    if _header_bytes(manifest_bytes, signature, tensors) != raw:
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
        return _read_header_from(f, os.fstat(f.fileno()).st_size, limits)


def _read_header_from(f: Any, file_size: int, limits: ReadLimits) -> PacketHeader:
    prefix = f.read(8)
    if len(prefix) < 8:
        return parse_header(prefix, file_size=file_size, limits=limits)
    (n,) = struct.unpack("<Q", prefix)
    body = f.read(min(n, limits.max_header_bytes, max(file_size - 8, 0)))
    return parse_header(prefix + body, file_size=file_size, limits=limits)


# --------------------------------------------------------------------------- data pass


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
        use_thread = header.data_size >= _THREAD_MIN_BYTES if threaded is None else threaded
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
                    if _has_nonfinite(memoryview(self._carry), dtype):
                        self.nonfinite = name
                        return
                    self._carry = b""
            usable = len(piece) - len(piece) % size
            if usable and _has_nonfinite(piece[:usable], dtype):
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
            raise PacketVerificationError(
                "digest_mismatch", "the tensor data does not match the signed digest (corrupted or tampered)"
            )
        if self.nonfinite is not None:
            raise PacketVerificationError("non_finite", f"tensor {self.nonfinite!r} contains NaN or Inf")
        return digest

    def __enter__(self) -> DataChecker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- signature

KeyLookup = VerifyKey | Iterable[VerifyKey] | Mapping[str, VerifyKey] | Callable[[str], VerifyKey | None]


def _resolver(keys: KeyLookup) -> Callable[[str], VerifyKey | None]:
    if isinstance(keys, VerifyKey):
        return lambda fp: keys if fp == keys.fingerprint else None
    if isinstance(keys, Mapping):
        return keys.get
    if callable(keys):
        return keys
    table = {k.fingerprint: k for k in keys}
    return table.get


def verify_signature(header: PacketHeader, keys: KeyLookup) -> VerifyKey:
    """Check the manifest's signature with the trusted key it names; return that key."""
    fp = header.manifest.key_fingerprint
    key = _resolver(keys)(fp)
    if key is None:
        raise PacketVerificationError(
            "unknown_key", f"the packet is signed by key {fp[:16]}…, which is not trusted here"
        )
    if key.fingerprint != fp:
        raise PacketVerificationError(
            "key_mismatch", f"the key found for {fp[:16]}… has fingerprint {key.fingerprint[:16]}…"
        )
    if not key.verify(header.signature, header.manifest_bytes):
        raise PacketVerificationError("signature_invalid", f"the signature does not verify with key {fp[:16]}…")
    return key


# --------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class VerifiedPacket:
    header: PacketHeader
    key: VerifyKey
    data_sha256: str

    @property
    def manifest(self) -> Manifest:
        return self.header.manifest


def _iter_file(f: Any, offset: int, length: int) -> Iterator[memoryview]:
    """Read ``length`` bytes from ``offset`` into two alternating buffers (see DataChecker)."""
    buffers = [bytearray(min(_CHUNK, max(length, 1))) for _ in range(2)]
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


def _iter_buffer(view: memoryview, offset: int, length: int) -> Iterator[memoryview]:
    for start in range(offset, offset + length, _CHUNK):
        yield view[start : min(start + _CHUNK, offset + length)]


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
        chunks: Iterable[memoryview] = _iter_buffer(view, header.data_offset, header.data_size)
        return VerifiedPacket(header, key, _check_data(header, chunks))
    with open(source, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        header = _read_header_from(f, size, limits)
        key = verify_signature(header, keys)
        digest = _check_data(header, _iter_file(f, header.data_offset, header.data_size))
    return VerifiedPacket(header, key, digest)


def _check_data(header: PacketHeader, chunks: Iterable[memoryview]) -> str:
    with DataChecker(header) as checker:
        for chunk in chunks:
            checker.update(chunk)
        return checker.finish()


def packet_id(source: str | os.PathLike[str] | bytes | bytearray | memoryview) -> str:
    """A packet's id: the sha256 of the whole file."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return hashlib.sha256(source).hexdigest()
    h = hashlib.sha256()
    with open(source, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        for chunk in _iter_file(f, 0, size):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- streaming


class _BackgroundSha256:
    """sha256 fed from a helper thread; a buffer must stay unchanged until the next update() returns."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="m2kt-sha256")
        self._pending: Future[None] | None = None

    def update(self, view: memoryview) -> None:
        if self._pending is not None:
            self._pending.result()
        self._pending = self._pool.submit(self._sha.update, view)

    def hexdigest(self) -> str:
        self.close()
        return self._sha.hexdigest()

    def close(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None
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
        self._checker = DataChecker(header, threaded=header.data_size >= _THREAD_MIN_BYTES)
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
            raise PacketVerificationError(
                "id_mismatch", f"received packet {packet_id[:16]}…, not the requested {self.expected_id[:16]}…"
            )
        return StreamResult(packet_id, self.size, self.header, data_digest)

    def close(self) -> None:
        self._file_sha.close()
        if self._checker is not None:
            self._checker.close()


# --------------------------------------------------------------------------- read


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
            if count == 0:
                arr = np.empty(tuple(spec.shape), dtype)
            else:
                arr = np.frombuffer(
                    self._buffer, dtype, count=count, offset=self.header.data_offset + spec.data_offsets[0]
                ).reshape(tuple(spec.shape))
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
            chunks = _iter_file(self._file, self.header.data_offset, self.header.data_size)
            digest = _check_data(self.header, chunks)
        else:
            digest = _check_data(
                self.header, _iter_buffer(self._buffer, self.header.data_offset, self.header.data_size)
            )
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
        header = _read_header_from(f, size, limits)
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except BaseException:
        f.close()
        raise
    return Packet(header, memoryview(mapped), path=path, file=f, owner=mapped)


# --------------------------------------------------------------------------- write


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
    specs = _layout({name: (_code_for(a), tuple(a.shape)) for name, a in arrays.items()})
    fields = body.model_dump()

    def manifest_for(digest: str) -> Manifest:
        try:
            return Manifest(**fields, tensors=specs, data_sha256=digest, key_fingerprint=key.fingerprint)
        except ValidationError as exc:
            raise PacketVerificationError("manifest_invalid", _first_error(exc)) from None

    draft = manifest_for("0" * 64)
    reserved = len(_header_bytes(draft.to_bytes(), bytes(SIGNATURE_BYTES), specs))
    draft_header = PacketHeader(draft, draft.to_bytes(), bytes(SIGNATURE_BYTES), tuple(specs), reserved)

    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(bytes(8 + reserved))
            with DataChecker(draft_header) as checker:  # hashes in a helper thread while we write
                for spec in specs:
                    flat = arrays[spec.name].reshape(-1).view(np.uint8)
                    for start in range(0, flat.size, _CHUNK):
                        chunk = flat[start : start + _CHUNK].data
                        checker.update(chunk)
                        f.write(chunk)
                digest = checker.digest()
                if checker.nonfinite is not None:
                    raise PacketVerificationError(
                        "non_finite", f"tensor {checker.nonfinite!r} contains NaN or Inf; a packet must not"
                    )
            manifest = manifest_for(digest)
            manifest_bytes = manifest.to_bytes()
            signature = key.sign(manifest_bytes)
            header_json = _header_bytes(manifest_bytes, signature, specs)
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
