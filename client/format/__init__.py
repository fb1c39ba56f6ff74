"""The packet format — the bottom layer: what a knowledge packet K = (C, A, R, M, σ) is on disk and on the wire.

A packet is **one safetensors file** (suffix ``.m2kt``); any safetensors reader can open it and nothing is
ever unpickled. M2KT packets are *canonical*: the header is exactly what :func:`write_packet` produces for
its content and the manifest is canonical JSON, so the packet id — the sha256 of the whole file — is a
function of (manifest, signature, tensor bytes).

Modules, one job each: ``manifest`` (the signed metadata M, as pydantic models), ``keys`` (Ed25519 keys,
key files, fingerprints), ``dtypes``, ``header`` (the bounded, canonical header), ``checker`` (the data
pass: digest and finiteness), ``signature``, ``verifier`` (:func:`verify_packet`, :func:`packet_id`),
``stream`` (:class:`StreamVerifier`, for bytes as they arrive), ``reader`` (:func:`open_packet`, zero-copy),
``writer`` (:func:`write_packet`), ``probe_text`` (the probe-input codec).

Every refusal is a :class:`~m2kt.errors.PacketError` with a stable ``code``: :class:`PacketFormatError`
for a malformed file (the broker answers 400), :class:`VerificationError` for a well-formed packet that
fails a check (422). This layer depends on numpy, safetensors' format, cryptography and pydantic only:
no torch, no HTTP. The broker imports it and nothing else of the client.
"""

from __future__ import annotations

from m2kt.errors import PacketError, PacketFormatError, VerificationError
from m2kt.format.checker import DataChecker
from m2kt.format.dtypes import DTYPES
from m2kt.format.header import (
    DEFAULT_LIMITS,
    PACKET_SUFFIX,
    PacketHeader,
    ReadLimits,
    parse_header,
    read_header,
)
from m2kt.format.keys import (
    KeyPairPaths,
    SigningKey,
    VerifyKey,
    fingerprint_of,
    generate_keypair,
    load_signing_key,
    load_verify_key,
    parse_verify_key,
)
from m2kt.format.manifest import (
    FORMAT_VERSION,
    ConceptEntry,
    DataUsage,
    ExtractionInfo,
    ExtractionStep,
    Manifest,
    ManifestBody,
    SafetyInfo,
    TeacherInfo,
    TensorSpec,
    canonical_json,
    manifest_json_schema,
)
from m2kt.format.probe_text import decode_probe_texts, encode_probe_texts
from m2kt.format.reader import Packet, open_packet
from m2kt.format.signature import KeyLookup, verify_signature
from m2kt.format.stream import StreamResult, StreamVerifier
from m2kt.format.verifier import VerifiedPacket, packet_id, verify_packet
from m2kt.format.writer import WrittenPacket, write_packet

__all__ = [
    "DEFAULT_LIMITS",
    "DTYPES",
    "FORMAT_VERSION",
    "PACKET_SUFFIX",
    "ConceptEntry",
    "DataChecker",
    "DataUsage",
    "ExtractionInfo",
    "ExtractionStep",
    "KeyLookup",
    "KeyPairPaths",
    "Manifest",
    "ManifestBody",
    "Packet",
    "PacketError",
    "PacketFormatError",
    "PacketHeader",
    "ReadLimits",
    "SafetyInfo",
    "SigningKey",
    "StreamResult",
    "StreamVerifier",
    "TeacherInfo",
    "TensorSpec",
    "VerificationError",
    "VerifiedPacket",
    "VerifyKey",
    "WrittenPacket",
    "canonical_json",
    "decode_probe_texts",
    "encode_probe_texts",
    "fingerprint_of",
    "generate_keypair",
    "load_signing_key",
    "load_verify_key",
    "manifest_json_schema",
    "open_packet",
    "packet_id",
    "parse_header",
    "parse_verify_key",
    "read_header",
    "verify_packet",
    "verify_signature",
    "write_packet",
]
