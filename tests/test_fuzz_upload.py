"""Malformed packets POSTed to the live upload route: every one is refused with a 4xx, none is stored.

Hypothesis builds hostile variants of one valid, signed packet, family by family:

* ``lying_length``   — the 8-byte header length bigger / smaller than the real header, tiny, huge;
* ``bad_offsets``    — overlapping, out-of-range, reversed, gapped, negative, non-integer offsets
  (sometimes in a manifest re-signed to agree, so the lie reaches the data-section checks);
* ``duplicate_keys`` — raw header JSON naming a tensor, ``__metadata__`` or an entry field twice;
* ``unknown_dtype``  — dtypes safetensors or M2KT does not know, or that are not strings;
* ``giant_shape``    — dims of 2**62, products past int64, too many dims, negative or non-int dims;
* ``deep_json``      — 1,000 to 250,000 levels of nesting in the header or in the signed manifest;
* ``huge_json``      — megabytes of header, a manifest over the limit, more tensors than allowed;
* ``invalid_utf8``   — invalid UTF-8 bytes in the header, escaped lone surrogates in its strings;
* ``bad_signature``  — base64 of the wrong length, not base64, non-canonical base64, not a string;
* ``manifest_types`` — manifest fields of the wrong type or out of range (re-signed: the signature
  is valid, the content is not), or a manifest that is not a JSON object;
* ``truncated``      — the body cut anywhere, or with bytes after the last tensor;
* ``data_section``   — a valid signed header over data that is flipped (digest mismatch), cut,
  extended, or holds NaN / Inf under a re-signed digest: refused only after staging has begun;
* ``bit_flips``      — a few bytes flipped anywhere in the file.

Each is sent as a teacher to a broker of its own (fresh database and bucket, uploads not
rate-limited, so every packet reaches the parser). Every answer must be 400, 413 or 422 with a
``code`` from :data:`KNOWN_CODES` — never 2xx, never 5xx. Afterwards: no packet row, no blob under
``packets/``, nothing in ``incoming/``, no unfinished multipart upload; the broker answers
``/healthz`` and ``/readyz``, logged no unhandled exception, and still accepts the valid packet.

Budget: ``FUZZ_EXAMPLES`` packets per family (``$M2KT_FUZZ_EXAMPLES`` overrides, e.g.
``M2KT_FUZZ_EXAMPLES=500``). Under ``CI=true`` Hypothesis is derandomized. The reader-level fuzz
(no HTTP) is ``tests/test_packet_fuzz.py``; this one goes through the broker's streaming upload.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import func, select

from m2kt.benchmarks.harness.brokers import Node, register_node
from m2kt.benchmarks.harness.packets import packet_bytes
from m2kt.benchmarks.harness.services import S3Server
from m2kt.broker.models import Packet
from m2kt.format.keys import SigningKey
from m2kt.format.manifest import canonical_json
from tests.conftest import LiveBroker
from tests.fuzz_tally import Tally, fuzz_examples, hypothesis_settings, own_broker, watch_server_errors

FUZZ_EXAMPLES = fuzz_examples(40)  # packets per family
TOPIC = "fuzz.upload"
MAX_HEADER = 4 << 20  # the broker's default max_header_bytes
MAX_MANIFEST = 1 << 20  # default max_manifest_bytes
MAX_TENSORS = 256  # default max_tensor_count
REFUSAL_STATUSES = {400, 413, 422}
KNOWN_CODES = frozenset(
    {
        # client/packet.py: structure, limits, encoding (400/413) and checks (422)
        "truncated",
        "trailing_bytes",
        "header_too_large",
        "header_out_of_bounds",
        "header_not_json",
        "header_too_complex",
        "header_not_utf8",
        "header_duplicate_key",
        "header_not_canonical",
        "metadata_missing",
        "manifest_too_large",
        "manifest_invalid",
        "manifest_not_canonical",
        "too_many_tensors",
        "bad_tensor_entry",
        "unknown_dtype",
        "bad_shape",
        "bad_offsets",
        "data_too_large",
        "tensor_table_mismatch",
        "signature_malformed",
        "signature_invalid",
        "digest_mismatch",
        "non_finite",
        # broker/services/upload.py and broker/validation.py
        "packet_too_large",
        "concepts_too_large",
        "unknown_key",
        "key_mismatch",
        "topic_mismatch",
        "upload_incomplete",
    }
)


# ----------------------------------------------------------------------------- the valid packet, taken apart


@dataclass(frozen=True)
class Good:
    """The valid packet the mutants start from, taken apart, and the key that signed it."""

    data: bytes
    header: dict[str, Any]  # the parsed header JSON, __metadata__ included
    manifest: dict[str, Any]  # the parsed signed manifest
    body: bytes  # the data section
    key: SigningKey

    @property
    def header_length(self) -> int:
        return struct.unpack_from("<Q", self.data)[0]

    @property
    def raw_header(self) -> bytes:
        return self.data[8 : 8 + self.header_length]

    @property
    def tensor_names(self) -> list[str]:
        return sorted(k for k in self.header if k != "__metadata__")

    def copy_header(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.header))

    def copy_manifest(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.manifest))


def take_apart(data: bytes, key: SigningKey) -> Good:
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + n])
    manifest = json.loads(header["__metadata__"]["m2kt.manifest"])
    return Good(data, header, manifest, data[8 + n :], key)


def padded(header_json: bytes) -> bytes:
    """Space-padded so that 8 + len is a multiple of 8, as the format wants."""
    return header_json + b" " * (-len(header_json) % 8)


def assemble(header_json: bytes, body: bytes, *, length: int | None = None, pad: bool = True) -> bytes:
    header_json = padded(header_json) if pad else header_json
    return struct.pack("<Q", len(header_json) if length is None else length) + header_json + body


def encode_header(doc: dict[str, Any]) -> bytes:
    """The header JSON the way the writer makes it (sorted keys, no spaces), NaN allowed for mutants."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True).encode(
        "utf-8", "surrogatepass"
    )


def signed(good: Good, manifest: dict[str, Any] | str) -> dict[str, str]:
    """A ``__metadata__`` for ``manifest``, with a valid signature by the good packet's key."""
    text = manifest if isinstance(manifest, str) else canonical_json(manifest).decode("utf-8")
    signature = good.key.sign(text.encode("utf-8", "surrogatepass"))
    return {"m2kt.manifest": text, "m2kt.signature": base64.b64encode(signature).decode("ascii")}


def with_tensor_table(good: Good, header: dict[str, Any], *, resign: bool) -> dict[str, Any]:
    """Optionally re-sign a manifest whose tensor table agrees with the (mutated) header's."""
    if not resign:
        return header
    manifest = good.copy_manifest()
    manifest["tensors"] = [
        {"name": name, **entry} for name, entry in sorted(header.items(), key=_offset_order) if name != "__metadata__"
    ]
    header["__metadata__"] = signed(good, manifest)
    return header


def _offset_order(item: tuple[str, Any]) -> tuple[Any, ...]:
    entry = item[1]
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    return (json.dumps(offsets, sort_keys=True), item[0])


@dataclass(frozen=True)
class Mutant:
    family: str
    how: str
    data: bytes


# ----------------------------------------------------------------------------- families

junk_json = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(-5, 5), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@st.composite
def lying_length(draw: st.DrawFn, good: Good) -> Mutant:
    real = good.header_length
    length = draw(
        st.one_of(
            st.integers(1, 4096).map(lambda d: real + d),
            st.integers(1, real).map(lambda d: real - d),
            st.sampled_from([0, 1, 7, 8, MAX_HEADER, MAX_HEADER + 1, MAX_HEADER + 8, 2**63, 2**64 - 1]),
            st.integers(0, 2**64 - 1),
        ).filter(lambda n: n != real)
    )
    return Mutant("lying_length", f"length {length} (real {real})", struct.pack("<Q", length) + good.data[8:])


OFFSET_KINDS = ["overlap", "past_end", "reversed", "gap", "negative", "not_int", "arity", "huge"]


@st.composite
def bad_offsets(draw: st.DrawFn, good: Good) -> Mutant:
    header = good.copy_header()
    name = draw(st.sampled_from(good.tensor_names))
    begin, end = header[name]["data_offsets"]
    kind = draw(st.sampled_from(OFFSET_KINDS))
    k = draw(st.integers(1, 4096))
    offsets: Any = {
        "overlap": [max(begin - k, 0), max(end - k, 0)] if begin else [0, end + k],
        "past_end": [begin + k, end + k],
        "reversed": [end, begin] if end != begin else [begin + k, begin],
        "gap": [begin + 8 * k, end + 8 * k],
        "negative": [-k, end],
        "not_int": draw(st.sampled_from([[float(begin), end], [str(begin), end], [None, end], [True, end]])),
        "arity": draw(st.sampled_from([[begin], [], [begin, end, end], begin])),
        "huge": [2**64 + begin, 2**64 + end],
    }[kind]
    assert json.dumps(offsets) != json.dumps([begin, end])
    header[name]["data_offsets"] = offsets
    resign = draw(st.booleans())
    header = with_tensor_table(good, header, resign=resign)
    return Mutant(
        "bad_offsets", f"{name}: {kind} {offsets!r} resigned={resign}", assemble(encode_header(header), good.body)
    )


@st.composite
def duplicate_keys(draw: st.DrawFn, good: Good) -> Mutant:
    raw = good.raw_header.rstrip(b" ")
    name = draw(st.sampled_from(good.tensor_names))
    entry = json.dumps(good.header[name], sort_keys=True, separators=(",", ":")).encode()
    where = draw(st.sampled_from(["tensor_same", "tensor_other", "metadata", "field", "manifest_key"]))
    if where == "tensor_same":  # the same entry twice
        text = raw[:-1] + b',"' + name.encode() + b'":' + entry + b"}"
    elif where == "tensor_other":  # a second, different entry under the same name, first
        other = dict(good.header[name], dtype="U8")
        text = b'{"' + name.encode() + b'":' + json.dumps(other).encode() + b"," + raw[1:]
    elif where == "metadata":
        text = raw[:-1] + b',"__metadata__":' + json.dumps(good.header["__metadata__"]).encode() + b"}"
    elif where == "field":  # "dtype" twice inside one tensor entry
        dup = entry[:-1] + b',"dtype":"F64"}'
        text = raw.replace(b'"' + name.encode() + b'":' + entry, b'"' + name.encode() + b'":' + dup, 1)
    else:  # a key repeated inside the signed manifest text (re-signed)
        manifest_text = canonical_json(good.manifest).decode()
        header = good.copy_header()
        header["__metadata__"] = signed(good, manifest_text[:-1] + ',"topic":"' + TOPIC + '"}')
        text = encode_header(header)
    assert text != raw
    return Mutant("duplicate_keys", f"{where} {name}", assemble(text, good.body))


@st.composite
def unknown_dtype(draw: st.DrawFn, good: Good) -> Mutant:
    header = good.copy_header()
    name = draw(st.sampled_from(good.tensor_names))
    dtype = draw(
        st.one_of(
            st.sampled_from(["F8_E4M3", "f32", "", "Q4", "F32 ", "C64", "U16", "U32", "U64", "BF16\x00", "float32"]),
            st.text(max_size=10).filter(lambda t: t not in {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8"}),
            st.one_of(st.integers(), st.none(), st.just(["F32"]), st.just({"F32": 1})),
        ).filter(lambda d: d not in ("U8", "BOOL"))
    )
    header[name]["dtype"] = dtype
    resign = draw(st.booleans())
    header = with_tensor_table(good, header, resign=resign)
    return Mutant("unknown_dtype", f"{name}: {dtype!r}", assemble(encode_header(header), good.body))


SHAPE_KINDS = ["2**62", "int64_overflow", "too_many_dims", "negative", "not_int", "not_list"]


@st.composite
def giant_shape(draw: st.DrawFn, good: Good) -> Mutant:
    header = good.copy_header()
    name = draw(st.sampled_from(good.tensor_names))
    entry = header[name]
    kind = draw(st.sampled_from(SHAPE_KINDS))
    shape: Any = {
        "2**62": [2**62, draw(st.integers(1, 4))],
        "int64_overflow": [2**40, 2**40, draw(st.integers(2, 2**20))],
        "too_many_dims": [1] * draw(st.integers(9, 64)),
        "negative": [draw(st.integers(-(2**63), -1)), 8],
        "not_int": draw(st.sampled_from([[8.0, 8], ["8", 8], [None], [True, 8], [[8], 8]])),
        "not_list": draw(st.sampled_from([8, "8x8", None, {"0": 8}])),
    }[kind]
    entry["shape"] = shape
    if draw(st.booleans()) and isinstance(shape, list) and all(isinstance(d, int) for d in shape):
        begin = entry["data_offsets"][0]
        count = 1
        for d in shape:
            count *= d
        entry["data_offsets"] = [begin, begin + count * {"F32": 4, "F16": 2, "I64": 8}.get(entry["dtype"], 8)]
    resign = draw(st.booleans())
    header = with_tensor_table(good, header, resign=resign)
    return Mutant("giant_shape", f"{name}: {kind} {str(shape)[:60]}", assemble(encode_header(header), good.body))


def nested(depth: int, opener: str) -> str:
    return ("[" * depth + "]" * depth) if opener == "[" else ('{"a":' * depth + "0" + "}" * depth)


@st.composite
def deep_json(draw: st.DrawFn, good: Good) -> Mutant:
    depth = draw(st.sampled_from([1_000, 10_000, 100_000, 250_000]))
    opener = draw(st.sampled_from(["[", "{"]))
    where = draw(st.sampled_from(["first_key", "last_key", "metadata_value", "manifest_params"]))
    deep = nested(depth, opener).encode()
    raw = good.raw_header.rstrip(b" ")
    if where == "first_key":  # an extra "tensor" whose entry is the deep value, parsed first
        raw = b'{"a-deep":' + deep + b"," + raw[1:]
    elif where == "last_key":
        raw = raw[:-1] + b',"zz":' + deep + b"}"
    elif where == "metadata_value":
        raw = raw.replace(b'"m2kt.signature":', b'"deep":' + deep + b',"m2kt.signature":', 1)
    else:  # inside the signed manifest: its JSON parser refuses the depth
        text = canonical_json(good.manifest).decode()
        header = good.copy_header()
        header["__metadata__"] = signed(good, text.replace('"params":{', '"params":{"deep":' + deep.decode() + ",", 1))
        raw = encode_header(header)
    return Mutant("deep_json", f"{where} depth={depth} {opener}", assemble(raw, good.body))


@st.composite
def huge_json(draw: st.DrawFn, good: Good) -> Mutant:
    kind = draw(st.sampled_from(["big_string", "over_header_limit", "big_manifest", "many_tensors"]))
    header = good.copy_header()
    if kind == "big_string":  # a large but allowed header with an unknown key
        header["zz"] = "x" * draw(st.sampled_from([64 << 10, 1 << 20, 3 << 20]))
    elif kind == "over_header_limit":
        header["zz"] = "x" * (MAX_HEADER + draw(st.integers(0, 4096)))
    elif kind == "big_manifest":
        manifest = good.copy_manifest()
        manifest["extraction"]["concepts"]["params"]["pad"] = "x" * (MAX_MANIFEST + draw(st.integers(0, 4096)))
        header["__metadata__"] = signed(good, manifest)
    else:
        count = draw(st.integers(MAX_TENSORS + 1, 4 * MAX_TENSORS))
        end = len(good.body)
        for i in range(count):
            header[f"t{i:05d}"] = {"dtype": "U8", "shape": [0], "data_offsets": [end, end]}
    return Mutant("huge_json", kind, assemble(encode_header(header), good.body))


BAD_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xf4\x90\x80\x80"]


@st.composite
def invalid_utf8(draw: st.DrawFn, good: Good) -> Mutant:
    raw = bytearray(good.raw_header)
    if draw(st.booleans()):  # raw invalid bytes, same length: only the encoding is wrong
        bad = draw(st.sampled_from(BAD_UTF8))
        at = draw(st.integers(1, len(raw) - len(bad) - 1))
        raw[at : at + len(bad)] = bad
        return Mutant("invalid_utf8", f"bytes {bad!r} at {at}", struct.pack("<Q", len(raw)) + bytes(raw) + good.body)
    # an escaped lone surrogate: valid UTF-8 JSON text that decodes to text no encoder accepts
    where = draw(st.sampled_from(["tensor_name", "manifest", "signature"]))
    header = good.copy_header()
    if where == "tensor_name":
        name = draw(st.sampled_from(good.tensor_names))
        header[name + "\ud800"] = header.pop(name)
    elif where == "manifest":
        manifest = good.copy_manifest()
        manifest["concepts"][0]["label"] = "\udc00 lone"
        header["__metadata__"] = signed(good, canonical_json_lossless(manifest))
    else:
        header["__metadata__"]["m2kt.signature"] = header["__metadata__"]["m2kt.signature"][:-2] + "\ud800="
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return Mutant("invalid_utf8", f"lone surrogate in {where}", assemble(text, good.body))


def canonical_json_lossless(value: Any) -> str:
    """canonical_json, but for text with lone surrogates (which cannot be UTF-8 encoded)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@st.composite
def bad_signature(draw: st.DrawFn, good: Good) -> Mutant:
    header = good.copy_header()
    real = base64.b64decode(header["__metadata__"]["m2kt.signature"])
    kind = draw(st.sampled_from(["length", "not_base64", "urlsafe", "unpadded", "whitespace", "noncanonical", "type"]))
    sig: Any
    if kind == "length":
        sig = base64.b64encode(draw(st.binary(max_size=160).filter(lambda b: len(b) != 64))).decode()
    elif kind == "not_base64":
        sig = draw(st.text(min_size=1, max_size=100).filter(lambda t: t != header["__metadata__"]["m2kt.signature"]))
    elif kind == "urlsafe":
        sig = base64.urlsafe_b64encode(real).decode().replace("+", "-").replace("/", "_")
        sig = sig if sig != header["__metadata__"]["m2kt.signature"] else "-" + sig[1:]
    elif kind == "unpadded":
        sig = base64.b64encode(real).decode().rstrip("=")
    elif kind == "whitespace":
        text = base64.b64encode(real).decode()
        sig = text[:40] + draw(st.sampled_from([" ", "\n", "\t", "\r\n"])) + text[40:]
    elif kind == "noncanonical":  # the last character's unused bits set: decodes, but is not canonical
        text = base64.b64encode(real).decode()
        sig = text[:-3] + ("B" if text[-3] == "A" else "A") + "=="
        sig = sig if base64.b64decode(sig) != real else text[:-3] + chr(ord(text[-3]) ^ 1) + "=="
    else:
        sig = draw(st.one_of(st.integers(), st.none(), st.just([base64.b64encode(real).decode()])))
    assert sig != header["__metadata__"]["m2kt.signature"]
    header["__metadata__"]["m2kt.signature"] = sig
    return Mutant("bad_signature", f"{kind}: {str(sig)[:40]!r}", assemble(encode_header(header), good.body))


MANIFEST_BREAKS: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("topic_int", lambda m: m.update(topic=123)),
    ("topic_invalid", lambda m: m.update(topic="Bad Topic!")),
    ("topic_null", lambda m: m.update(topic=None)),
    ("concepts_str", lambda m: m.update(concepts="x")),
    ("concepts_empty", lambda m: m.update(concepts=[])),
    ("concept_score_2", lambda m: m["concepts"][0].update(safety_score=2.0)),
    ("concept_extra", lambda m: m["concepts"][0].update(extra=1)),
    ("d_model_str", lambda m: m["teacher"].update(d_model="8")),
    ("d_model_negative", lambda m: m["teacher"].update(d_model=-8)),
    ("d_model_huge", lambda m: m["teacher"].update(d_model=2**70)),
    ("d_model_float", lambda m: m["teacher"].update(d_model=8.5)),
    ("created_at_int", lambda m: m.update(created_at=12345)),
    ("created_at_naive", lambda m: m.update(created_at="2026-11-22T12:00:00")),
    ("data_sha256_upper", lambda m: m.update(data_sha256=m["data_sha256"].upper())),
    ("data_sha256_short", lambda m: m.update(data_sha256=m["data_sha256"][:-1])),
    ("fingerprint_short", lambda m: m.update(key_fingerprint=m["key_fingerprint"][:10])),
    ("format_version_2", lambda m: m.update(format_version=2)),
    ("format_version_str", lambda m: m.update(format_version="1")),
    ("tensors_dict", lambda m: m.update(tensors={})),
    ("tensors_empty", lambda m: m.update(tensors=[])),
    ("tensors_duplicate", lambda m: m.update(tensors=m["tensors"] + m["tensors"][:1])),
    ("extra_field", lambda m: m.update(x=1)),
    ("parents_not_ids", lambda m: m.update(parents=["not-a-packet-id"])),
    ("parents_repeat", lambda m: m.update(parents=["ab" * 32, "ab" * 32])),
    ("missing_safety", lambda m: m.pop("safety")),
    ("extraction_null", lambda m: m.update(extraction=None)),
]
NOT_OBJECTS = ["", "{", "[]", "null", '"str"', "1e999", "NaN", '{"topic":'] + ["[" * 5000]


@st.composite
def manifest_types(draw: st.DrawFn, good: Good) -> Mutant:
    header = good.copy_header()
    if draw(st.integers(0, 5)) == 0:
        text = draw(st.sampled_from(NOT_OBJECTS))
        header["__metadata__"] = signed(good, text)
        how = f"not an object: {text[:20]!r}"
    elif draw(st.integers(0, 5)) == 0:
        header["__metadata__"]["m2kt.manifest"] = draw(junk_json.filter(lambda v: not isinstance(v, str)))
        how = "not a string"
    else:
        how, breaks = draw(st.sampled_from(MANIFEST_BREAKS))
        manifest = good.copy_manifest()
        breaks(manifest)
        header["__metadata__"] = signed(good, canonical_json_lossless(manifest))
    return Mutant("manifest_types", how, assemble(encode_header(header), good.body))


@st.composite
def truncated(draw: st.DrawFn, good: Good) -> Mutant:
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(good.data) - 1))
        return Mutant("truncated", f"first {cut} of {len(good.data)} bytes", good.data[:cut])
    extra = draw(st.binary(min_size=1, max_size=64))
    return Mutant("truncated", f"{len(extra)} trailing bytes", good.data + extra)


@st.composite
def data_section(draw: st.DrawFn, good: Good) -> Mutant:
    """A valid, signed header over a broken data section: refused only after staging has begun."""
    body = bytearray(good.body)
    kind = draw(st.sampled_from(["flip", "non_finite", "cut", "extra"]))
    if kind == "flip":  # the signed digest no longer matches
        at = draw(st.integers(0, len(body) - 1))
        body[at] ^= draw(st.integers(1, 255))
        return Mutant("data_section", f"flip at {at}", good.data[: -len(body)] + bytes(body))
    if kind == "cut":
        keep = draw(st.integers(0, len(body) - 1))
        return Mutant("data_section", f"data cut to {keep}", good.data[: len(good.data) - len(body) + keep])
    if kind == "extra":
        return Mutant("data_section", "trailing data", good.data + draw(st.binary(min_size=1, max_size=4096)))
    # NaN or Inf in a float tensor, with a digest re-signed to match: only the finiteness check refuses it
    name = draw(st.sampled_from(["concepts", "traces"]))
    begin, end = good.header[name]["data_offsets"]
    width = 4 if name == "concepts" else 2
    at = begin + width * draw(st.integers(0, (end - begin) // width - 1))
    bad = {4: [b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff"], 2: [b"\x00\x7e", b"\x00\x7c"]}
    body[at : at + width] = draw(st.sampled_from(bad[width]))
    manifest = good.copy_manifest()
    manifest["data_sha256"] = hashlib.sha256(body).hexdigest()
    header = good.copy_header()
    header["__metadata__"] = signed(good, manifest)
    how = f"non-finite {name}[{(at - begin) // width}]"
    return Mutant("data_section", how, assemble(encode_header(header), bytes(body)))


@st.composite
def bit_flips(draw: st.DrawFn, good: Good) -> Mutant:
    data = bytearray(good.data)
    flips = draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)), min_size=1, max_size=8))
    for at, mask in flips:
        data[at] ^= mask
    if bytes(data) == good.data:  # masks that cancelled out at the same position
        data[flips[0][0]] ^= 0xFF
    return Mutant("bit_flips", f"{len(flips)} flips at {sorted(a for a, _ in flips)[:8]}", bytes(data))


FAMILIES: list[Callable[[Good], st.SearchStrategy[Mutant]]] = [
    lying_length,
    bad_offsets,
    duplicate_keys,
    unknown_dtype,
    giant_shape,
    deep_json,
    huge_json,
    invalid_utf8,
    bad_signature,
    manifest_types,
    truncated,
    data_section,
    bit_flips,
]


# ----------------------------------------------------------------------------- sending and checking


@pytest.fixture(scope="module")
def broker(postgres_url: str, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveBroker]:
    with own_broker(postgres_url, s3_server, tmp_path_factory.mktemp("fuzz-upload")) as live:
        yield live


@pytest.fixture(scope="module")
def teacher(broker: LiveBroker) -> Node:
    return register_node(broker.url, broker.admin_token, "teacher")


@pytest.fixture(scope="module")
def good(teacher: Node, tmp_path_factory: pytest.TempPathFactory) -> Good:
    assert teacher.key is not None
    return take_apart(packet_bytes(tmp_path_factory.mktemp("good"), teacher.key, TOPIC), teacher.key)


class Sender:
    """POSTs mutants as the teacher and judges each answer."""

    def __init__(self, broker: LiveBroker, teacher: Node, tally: Tally) -> None:
        self.http = httpx.Client(base_url=broker.url, headers={"Authorization": f"Bearer {teacher.token}"}, timeout=120)
        self.tally = tally
        self.codes: dict[str, Counter[str]] = {}

    def send(self, mutant: Mutant) -> None:
        try:
            r = self.http.post(
                f"/v1/topics/{TOPIC}/packets",
                content=mutant.data,
                headers={"Content-Type": "application/octet-stream"},
            )
        except httpx.TransportError as exc:  # no answer at all: the server dropped the connection
            self.tally.record(0, mutant.family)
            self.tally.fail(f"{mutant.family} ({mutant.how}): no response: {exc!r}")
            return
        self.tally.record(r.status_code, mutant.family)
        code = self.judge(mutant, r)
        self.codes.setdefault(mutant.family, Counter())[f"{r.status_code} {code}"] += 1

    def judge(self, mutant: Mutant, r: httpx.Response) -> str:
        try:
            body = r.json()
        except ValueError:
            body = {}
        code = body.get("code", "?") if isinstance(body, dict) else "?"
        if r.status_code not in REFUSAL_STATUSES or code not in KNOWN_CODES or not body.get("message"):
            self.tally.fail(
                f"{mutant.family} ({mutant.how}) → {r.status_code} {r.text[:300]!r}; "
                f"first bytes {mutant.data[:48].hex()} ({len(mutant.data)} bytes)"
            )
        return code


def fuzz_family(family: Callable[[Good], st.SearchStrategy[Mutant]], good: Good, sender: Sender) -> None:
    @hypothesis_settings(FUZZ_EXAMPLES)
    @given(mutant=family(good))
    def run(mutant: Mutant) -> None:
        assert mutant.data != good.data, mutant.how
        sender.send(mutant)

    run()


def stored(broker: LiveBroker, s3_server: S3Server) -> dict[str, Any]:
    """What the broker holds: packet rows, blob keys by prefix, unfinished multipart uploads."""
    with broker.state.sessions() as session:  # type: ignore[attr-defined]
        rows = session.scalar(select(func.count()).select_from(Packet)) or 0
    client = s3_server.client()
    keys = [
        obj["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=broker.bucket)
        for obj in page.get("Contents", [])
    ]
    uploads = client.list_multipart_uploads(Bucket=broker.bucket).get("Uploads", [])
    return {
        "rows": rows,
        "packets": [k for k in keys if "packets/" in k],
        "incoming": [k for k in keys if "incoming/" in k],
        "unfinished_uploads": [u["Key"] for u in uploads],
    }


def test_malformed_packets_are_refused_and_leave_nothing(
    broker: LiveBroker, teacher: Node, good: Good, s3_server: S3Server, tmp_path: Path
) -> None:
    tally = Tally("upload-malformed", extra={"examples_per_family": FUZZ_EXAMPLES})
    sender = Sender(broker, teacher, tally)
    with watch_server_errors(tally):
        for family in FAMILIES:
            fuzz_family(family, good, sender)
        after = stored(broker, s3_server)
        tally.check_health(broker.url)
        ready = httpx.get(f"{broker.url}/readyz", timeout=10).status_code
        accepted = sender.http.post(f"/v1/topics/{TOPIC}/packets", content=good.data)
    tally.extra.update(
        malformed_packets=tally.requests,
        codes={family: dict(sorted(c.items())) for family, c in sender.codes.items()},
        stored_after=after,
        valid_packet_after=accepted.status_code,
    )
    tally.report(tmp_path)

    assert tally.server_errors == 0, f"5xx answers: {tally.failures[:5]}"
    assert tally.crashes == 0, f"the server logged unhandled errors: {tally.errors_logged[:5]}"
    assert tally.failure_count == 0, "not refused as expected:\n" + "\n".join(tally.failures[:10])
    assert after == {"rows": 0, "packets": [], "incoming": [], "unfinished_uploads": []}, after
    assert ready == 200
    assert accepted.status_code == 201, accepted.text  # still works, and the good packet was never stored before
    assert accepted.json()["id"] == hashlib.sha256(good.data).hexdigest()
    final = stored(broker, s3_server)
    assert final["rows"] == 1 and len(final["packets"]) == 1 and not final["unfinished_uploads"], final
