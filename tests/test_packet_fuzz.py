"""Hostile bytes never crash the reader or make it allocate: only PacketError comes out."""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m2kt.benchmarks.harness.packets import make_body, make_tensors
from m2kt.format import PacketError, ReadLimits, open_packet, parse_header, verify_packet, write_packet

MEMORY_CEILING = 32 << 20  # bytes the reader may allocate for any one hostile input
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _refuses_cheaply(data: bytes, key) -> None:
    tracemalloc.start()
    try:
        for attempt in (lambda: open_packet(data), lambda: verify_packet(data, key)):
            try:
                attempt()
            except PacketError:
                pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_CEILING, f"reader allocated {peak} bytes for a {len(data)}-byte input"


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes(data: bytes, signing_key) -> None:
    _refuses_cheaply(data, signing_key.verify_key)


json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=20
)
dtypes = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "Q4", "", "f32"])
dims = st.integers(-3, 2**64)
tensor_entries = (
    st.fixed_dictionaries(
        {
            "dtype": dtypes,
            "shape": st.lists(dims, max_size=10),
            "data_offsets": st.lists(st.integers(-5, 2**66), min_size=0, max_size=3),
        }
    )
    | json_values
)


@st.composite
def safetensors_shaped(draw: st.DrawFn) -> bytes:
    """Files that look like safetensors: a length prefix (honest or lying), JSON, some data."""
    doc: dict[str, object] = {}
    if draw(st.booleans()):
        doc["__metadata__"] = draw(
            st.dictionaries(
                st.sampled_from(["m2kt.manifest", "m2kt.signature", "x"]),
                st.text(max_size=200) | json_values,
                max_size=3,
            )
        )
    doc.update(draw(st.dictionaries(st.text(min_size=0, max_size=12), tensor_entries, max_size=6)))
    header = json.dumps(doc, allow_nan=True).encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        header += b" " * (-len(header) % 8)
    length = len(header) if draw(st.booleans()) else draw(st.integers(0, 2**64 - 1))
    data = draw(st.binary(max_size=512))
    return struct.pack("<Q", length) + header + data


@FUZZ
@given(data=safetensors_shaped())
def test_safetensors_shaped_files(data: bytes, signing_key) -> None:
    _refuses_cheaply(data, signing_key.verify_key)


@pytest.fixture(scope="module")
def valid_packet(tmp_path_factory: pytest.TempPathFactory, signing_key) -> bytes:
    return write_packet(
        tmp_path_factory.mktemp("fz") / "p.m2kt", make_body(), make_tensors(), signing_key
    ).path.read_bytes()


@FUZZ
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 10**6), st.sampled_from(["flip", "insert", "delete"]), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    )
)
def test_mutated_valid_packets_are_refused(valid_packet: bytes, signing_key, edits) -> None:
    data = bytearray(valid_packet)
    for pos, op, value in edits:
        pos %= len(data) + (op == "insert")
        if op == "flip":
            data[pos] ^= value or 1
        elif op == "insert":
            data.insert(pos, value)
        elif len(data) > 1:
            del data[pos]
    if bytes(data) == valid_packet:
        return
    with pytest.raises(PacketError):
        verify_packet(bytes(data), signing_key.verify_key)
    _refuses_cheaply(bytes(data), signing_key.verify_key)


@pytest.mark.parametrize(
    ("header", "code"),
    [
        pytest.param(b"[" * 100_000 + b"]" * 100_000, "header_not_json", id="deep-json"),
        pytest.param(b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "header_not_json", id="deep-objects"),
        pytest.param(b"{" + b'"k":[],' * 300_000 + b'"z":1}', "header_too_complex", id="many-containers"),
        pytest.param(b'{"x":"\xff\xfe"}', "header_not_utf8", id="invalid-utf8"),
        pytest.param(
            b'{"__metadata__":{"m2kt.manifest":"{}","m2kt.signature":"AA=="},'
            b'"t":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,1]}}',
            "bad_offsets",
            id="giant-shape",
        ),
        pytest.param(
            b'{"__metadata__":{"m2kt.manifest":"{}","m2kt.signature":"AA=="},'
            b'"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
            "header_duplicate_key",
            id="duplicate-names",
        ),
        pytest.param(
            b'{"__metadata__":{"m2kt.manifest":"{}","m2kt.signature":"AA=="},'
            b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}',
            "bad_offsets",
            id="overlapping-offsets",
        ),
        pytest.param(
            b'{"__metadata__":{"m2kt.manifest":"{}","m2kt.signature":"AA=="},'
            b'"a":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}',
            "unknown_dtype",
            id="unknown-dtype",
        ),
        pytest.param(
            b'{"__metadata__":{"m2kt.manifest":"{}","m2kt.signature":"AAAA"},'
            b'"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
            "signature_malformed",
            id="short-signature",
        ),
        pytest.param(b'{"a":NaN}', "header_not_json", id="nan-constant"),
    ],
)
def test_named_hostile_headers(header: bytes, code: str, signing_key) -> None:
    header += b" " * (-len(header) % 8)
    data = struct.pack("<Q", len(header)) + header + bytes(16)
    with pytest.raises(PacketError) as err:
        parse_header(data, limits=ReadLimits(max_header_bytes=8 << 20))
    assert err.value.code == code
    _refuses_cheaply(data, signing_key.verify_key)


def test_lying_length_beyond_the_file_allocates_nothing(tmp_path: Path, signing_key) -> None:
    path = tmp_path / "liar.m2kt"
    path.write_bytes(struct.pack("<Q", (4 << 20) - 8) + b"{}")
    tracemalloc.start()
    with pytest.raises(PacketError) as err:
        open_packet(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert err.value.code == "header_out_of_bounds" and peak < 1 << 20
