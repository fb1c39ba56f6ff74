"""Every class of byte in a packet is covered: change any of it and verification refuses,
with an error code specific to what was changed."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from m2kt.benchmarks.harness.packets import make_body, make_tensors
from m2kt.format import PacketError, PacketFormatError, VerificationError, open_packet, verify_packet, write_packet

FLIPS = (0x01, 0x20, 0x80)  # low bit, case/space bit, high bit (breaks UTF-8)
HEADER_STRUCTURE = {
    "header_not_json",
    "header_not_utf8",
    "header_duplicate_key",
    "metadata_missing",
    "bad_tensor_entry",
    "unknown_dtype",
    "bad_shape",
    "bad_offsets",
    "tensor_table_mismatch",
    "header_not_canonical",
    "truncated",
    "trailing_bytes",
}


@pytest.fixture(scope="module")
def packet(tmp_path_factory: pytest.TempPathFactory, signing_key) -> bytes:
    tensors = {**make_tensors(), "bf": np.linspace(-1, 1, 12).astype(ml_dtypes.bfloat16).reshape(3, 4)}
    path = tmp_path_factory.mktemp("tamper") / "p.m2kt"
    return write_packet(path, make_body(), tensors, signing_key).path.read_bytes()


def _regions(data: bytes) -> dict[str, range]:
    """Byte ranges of each class in a canonical packet."""
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + n]
    doc = json.loads(header)
    meta = doc.pop("__metadata__")
    manifest_json = json.dumps(meta["m2kt.manifest"], ensure_ascii=False).encode()[1:-1]
    sig = meta["m2kt.signature"].encode()
    m_at, s_at = header.index(manifest_json), header.index(sig)
    regions = {
        "length_prefix": range(0, 8),
        "manifest": range(8 + m_at, 8 + m_at + len(manifest_json)),
        "signature": range(8 + s_at, 8 + s_at + len(sig)),
    }
    inside = set(regions["manifest"]) | set(regions["signature"])
    regions["header_json"] = [i for i in range(8, 8 + n) if i not in inside]  # type: ignore[assignment]
    for name, entry in doc.items():
        a, b = entry["data_offsets"]
        regions[f"tensor:{name}"] = range(8 + n + a, 8 + n + b)
    return regions


def _refusal(data: bytes, key) -> PacketError:
    with pytest.raises(PacketError) as err:
        verify_packet(data, key)
    return err.value


def _codes_after_flips(data: bytes, positions, key) -> set[str]:
    codes = set()
    for i in positions:
        for flip in FLIPS:
            mutated = bytearray(data)
            mutated[i] ^= flip
            codes.add(_refusal(bytes(mutated), key).code)
    return codes


def test_untouched_packet_verifies(packet: bytes, signing_key) -> None:
    assert verify_packet(packet, signing_key.verify_key).manifest.topic == "arith.mod97"


def test_regions_cover_every_byte(packet: bytes) -> None:
    covered = sorted(i for r in _regions(packet).values() for i in r)
    assert covered == list(range(len(packet)))


@pytest.mark.parametrize(
    ("region", "allowed"),
    [
        pytest.param(
            "length_prefix", {"header_too_large", "header_out_of_bounds", "header_not_json"}, id="header-length"
        ),
        pytest.param("header_json", HEADER_STRUCTURE, id="header-json"),
        pytest.param(
            "manifest",
            {
                "manifest_invalid",
                "manifest_not_canonical",
                "signature_invalid",
                "unknown_key",
                "tensor_table_mismatch",
                "header_not_json",
                "header_not_utf8",
            },
            id="manifest",
        ),
        pytest.param(
            "signature",
            {"signature_malformed", "signature_invalid", "header_not_json", "header_not_utf8"},
            id="signature",
        ),
    ],
)
def test_flipping_any_header_byte_is_refused(packet: bytes, signing_key, region: str, allowed: set[str]) -> None:
    codes = _codes_after_flips(packet, _regions(packet)[region], signing_key.verify_key)
    assert codes <= allowed, f"unexpected refusal codes {codes - allowed}"
    assert codes, "no flip was tried"


def test_flipping_any_tensor_byte_is_a_digest_mismatch(packet: bytes, signing_key) -> None:
    regions = {k: v for k, v in _regions(packet).items() if k.startswith("tensor:")}
    assert len(regions) == 4
    for name, positions in regions.items():
        assert _codes_after_flips(packet, positions, signing_key.verify_key) == {"digest_mismatch"}, name


@pytest.mark.parametrize("extra", [b"\x00", b" ", b"x" * 8, bytes(4096)], ids=["1-null", "1-space", "8", "4096"])
def test_trailing_bytes_are_refused(packet: bytes, signing_key, extra: bytes) -> None:
    err = _refusal(packet + extra, signing_key.verify_key)
    assert isinstance(err, PacketFormatError) and err.code == "trailing_bytes"


def test_every_truncation_is_refused(packet: bytes, signing_key) -> None:
    codes = {_refusal(packet[:cut], signing_key.verify_key).code for cut in range(len(packet))}
    assert codes == {"truncated", "header_out_of_bounds"}


def test_tampering_is_caught_reading_from_a_file_too(packet: bytes, signing_key, tmp_path: Path) -> None:
    path = tmp_path / "t.m2kt"
    last = bytearray(packet)
    last[-1] ^= 0x01
    for data, code in ((bytes(last), "digest_mismatch"), (packet[:-3], "truncated"), (packet + b"!", "trailing_bytes")):
        path.write_bytes(data)
        with pytest.raises(PacketError) as err:
            verify_packet(path, signing_key.verify_key)
        assert err.value.code == code
        if code == "digest_mismatch":  # open_packet checks structure only; .verify() does the rest
            with open_packet(path) as p, pytest.raises(VerificationError):
                p.verify(signing_key.verify_key)


def test_packet_signed_by_another_key_is_refused(tmp_path: Path, signing_key, other_key) -> None:
    theirs = write_packet(tmp_path / "theirs.m2kt", make_body(), make_tensors(), other_key).path.read_bytes()
    assert _refusal(theirs, signing_key.verify_key).code == "unknown_key"
    # Trusting both keys accepts it, and names the key that signed.
    assert verify_packet(theirs, [signing_key.verify_key, other_key.verify_key]).key == other_key.verify_key


def test_swapped_signature_or_claimed_fingerprint_is_refused(tmp_path: Path, signing_key, other_key) -> None:
    ours = write_packet(tmp_path / "ours.m2kt", make_body(), make_tensors(), signing_key)
    data = ours.path.read_bytes()
    # The other key signs our exact manifest (which names our fingerprint): the signature fails.
    forged_sig = base64.b64encode(other_key.sign(ours.header.manifest_bytes))
    real_sig = base64.b64encode(ours.header.signature)
    forged = data.replace(real_sig, forged_sig)
    assert forged != data
    assert _refusal(forged, signing_key.verify_key).code == "signature_invalid"


def test_non_canonical_signature_encoding_is_refused(packet: bytes, signing_key) -> None:
    # The last base64 character of a 64-byte value carries 4 unused bits: a lenient decoder
    # accepts several spellings of one signature, which would let anyone change a packet's id.
    (n,) = struct.unpack("<Q", packet[:8])
    sig = json.loads(packet[8 : 8 + n])["__metadata__"]["m2kt.signature"].encode()
    assert sig.endswith(b"==")
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    alt = sig[:-3] + bytes([alphabet[alphabet.index(sig[-3]) ^ 0x01]]) + b"=="  # flip an unused bit
    assert base64.b64decode(alt) == base64.b64decode(sig)
    assert _refusal(packet.replace(sig, alt), signing_key.verify_key).code == "signature_malformed"


def test_signed_non_finite_values_are_refused(tmp_path: Path, signing_key) -> None:
    # A signer can sign NaN (it is not refused by the digest): verification still says no.
    tensors = make_tensors()
    written = write_packet(tmp_path / "p.m2kt", make_body(), tensors, signing_key)
    data = bytearray(written.path.read_bytes())
    spec = next(t for t in written.header.tensors if t.name == "traces")
    at = written.header.data_offset + spec.data_offsets[0] + 2 * 5
    data[at : at + 2] = np.array([np.inf], np.float16).tobytes()
    import hashlib

    from m2kt.format.header import encode_header as _header_bytes
    from m2kt.format.manifest import Manifest

    digest = hashlib.sha256(bytes(data[written.header.data_offset :])).hexdigest()
    manifest = Manifest(**{**written.manifest.model_dump(), "data_sha256": digest})
    mb = manifest.to_bytes()
    header = _header_bytes(mb, signing_key.sign(mb), written.header.tensors)
    resigned = struct.pack("<Q", len(header)) + header + bytes(data[written.header.data_offset :])
    err = _refusal(resigned, signing_key.verify_key)
    assert err.code == "non_finite" and "traces" in err.message


def test_verify_checks_the_mapped_file_not_a_replacement(tmp_path: Path, signing_key) -> None:
    """A file swapped in at the same path after open_packet is not what Packet.verify reads."""
    path = tmp_path / "p.m2kt"
    write_packet(path, make_body(), make_tensors(), signing_key)
    with open_packet(path) as packet:
        good = bytes(packet.tensors["concepts"].tobytes())
        bad = bytearray(path.read_bytes())
        bad[-1] ^= 0x01
        replacement = tmp_path / "swap.m2kt"
        replacement.write_bytes(bytes(bad))
        replacement.replace(path)  # a new inode at the same path
        packet.verify(signing_key.verify_key)  # verifies the bytes that are mapped, and they are intact
        assert packet.tensors["concepts"].tobytes() == good
    with pytest.raises(VerificationError):
        verify_packet(path, signing_key.verify_key)
