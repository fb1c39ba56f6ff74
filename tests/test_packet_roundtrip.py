"""build → write → read → verify returns exactly what went in, for every supported dtype."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from m2kt.benchmarks.harness.packets import make_body, make_tensors
from m2kt.format import VerificationError, open_packet, packet_id, read_header, verify_packet, write_packet
from m2kt.format.manifest import Manifest


def _tensor(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "int64":
        return rng.integers(-(2**62), 2**62, shape, dtype=np.int64)
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    return (rng.standard_normal(shape) * 100).astype(np_dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64", "int64", "int32", "uint8", "bool"])
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((3, 5), id="matrix"),
        pytest.param((0, 7), id="zero-size"),
        pytest.param((), id="scalar"),
        pytest.param((2, 3, 4, 5), id="4d"),
    ],
)
def test_round_trip_is_exact_for_file_and_buffer(tmp_path: Path, signing_key, dtype: str, shape) -> None:
    body = make_body(k=4, d=8)
    tensors = {"concepts": _tensor("float32", (4, 8)), "extra": _tensor(dtype, shape, seed=1)}
    written = write_packet(tmp_path / "p.m2kt", body, tensors, signing_key)

    for source in (written.path, written.path.read_bytes()):
        result = verify_packet(source, signing_key.verify_key)
        assert result.manifest == written.manifest
        with open_packet(source) as packet:
            assert packet.manifest.body() == body
            assert set(packet.tensors) == set(tensors)
            for name, expected in tensors.items():
                got = packet.tensors[name]
                assert got.dtype == expected.dtype and got.shape == expected.shape
                assert got.tobytes() == expected.tobytes()
                assert not got.flags.writeable
    assert written.size == written.path.stat().st_size == written.header.file_size


def test_empty_tensors_of_different_item_sizes_share_an_offset(tmp_path: Path, signing_key) -> None:
    """Empty tensors sit at one offset; the reader orders them as the canonical layout does (item size,
    then name) — a packet whose concepts are all private has an empty U8 probe_text beside empty F32s."""
    body = make_body(k=4, d=8)
    tensors = {
        "concepts": _tensor("float32", (4, 8)),
        "probe_text": np.zeros(0, dtype=np.uint8),
        "traces": np.zeros((0, 3, 8), dtype=np.float32),
        "probe_tokens": np.zeros((0, 5), dtype=np.int32),
        "a_offsets": np.zeros(1, dtype=np.int64),
    }
    written = write_packet(tmp_path / "p.m2kt", body, tensors, signing_key)
    verify_packet(written.path, signing_key.verify_key)
    with open_packet(written.path) as packet:
        assert {n: t.shape for n, t in packet.tensors.items()} == {n: t.shape for n, t in tensors.items()}


def test_manifest_records_what_the_writer_computed(tmp_path: Path, signing_key) -> None:
    tensors = make_tensors()
    written = write_packet(tmp_path / "p.m2kt", make_body(), tensors, signing_key)
    m = written.manifest
    assert m.format_version == 1
    assert m.key_fingerprint == signing_key.fingerprint
    assert {t.name: (t.dtype, t.shape) for t in m.tensors} == {
        "concepts": ("F32", [4, 8]),
        "traces": ("F16", [3, 3, 8]),
        "probe_tokens": ("I64", [3, 5]),
    }
    # The signed manifest bytes are canonical JSON and parse back to the same model.
    raw = read_header(written.path).manifest_bytes
    assert raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert Manifest.model_validate_json(raw) == m
    assert m.created_at.isoformat() == "2026-11-22T12:00:00.123456+00:00"


def test_layout_is_aligned_and_header_padded(tmp_path: Path, signing_key) -> None:
    tensors = {**make_tensors(), "flags": np.array([True, False]), "bf": np.ones(3, ml_dtypes.bfloat16)}
    written = write_packet(tmp_path / "p.m2kt", make_body(), tensors, signing_key)
    data = written.path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert (8 + n) % 8 == 0
    for spec in written.header.tensors:  # descending item size keeps every tensor naturally aligned
        assert spec.data_offsets[0] % np.dtype(tensors[spec.name].dtype).itemsize == 0


def test_same_inputs_give_the_same_bytes(tmp_path: Path, signing_key) -> None:
    a = write_packet(tmp_path / "a.m2kt", make_body(), make_tensors(), signing_key)
    b = write_packet(tmp_path / "b.m2kt", make_body(), make_tensors(), signing_key)
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.id == b.id == packet_id(a.path.read_bytes())


def test_any_safetensors_reader_opens_a_packet(tmp_path: Path, signing_key) -> None:
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from safetensors.numpy import load_file  # the numpy loader has no bfloat16, so it reads a second packet

    tensors = {**make_tensors(), "bf": np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(2, 3)}
    written = write_packet(tmp_path / "p.m2kt", make_body(), tensors, signing_key)
    with safe_open(str(written.path), framework="pt") as f:
        meta = f.metadata()
        assert set(meta) == {"m2kt.manifest", "m2kt.signature"}
        assert meta["m2kt.manifest"].encode() == written.header.manifest_bytes
        for name, expected in tensors.items():
            t = f.get_tensor(name)
            raw = t.view(dtype=torch.int16).numpy().tobytes() if name == "bf" else t.numpy().tobytes()
            assert raw == expected.tobytes()
    np_tensors = {k: v for k, v in tensors.items() if k != "bf"}
    written2 = write_packet(tmp_path / "q.m2kt", make_body(), np_tensors, signing_key)
    for name, arr in load_file(str(written2.path)).items():
        assert np.array_equal(arr, np_tensors[name])


def test_big_endian_and_non_contiguous_inputs_are_normalised(tmp_path: Path, signing_key) -> None:
    concepts = np.asfortranarray(np.arange(32, dtype=">f4").reshape(4, 8))
    written = write_packet(tmp_path / "p.m2kt", make_body(), {"concepts": concepts}, signing_key)
    with open_packet(written.path) as p:
        assert p.tensors["concepts"].dtype == np.dtype("<f4")
        assert np.array_equal(p.tensors["concepts"], concepts)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_writer_refuses_non_finite_and_leaves_nothing(tmp_path: Path, signing_key, bad: float, dtype: str) -> None:
    concepts = np.zeros((4, 8), np.float32)
    extra = np.zeros(10, ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    extra[7] = bad
    with pytest.raises(VerificationError) as err:
        write_packet(tmp_path / "p.m2kt", make_body(), {"concepts": concepts, "x": extra}, signing_key)
    assert err.value.code == "non_finite" and "'x'" in err.value.message
    assert list(tmp_path.iterdir()) == []


def test_writer_checks_manifest_against_tensors(tmp_path: Path, signing_key) -> None:
    with pytest.raises(VerificationError) as err:
        write_packet(tmp_path / "p.m2kt", make_body(k=4), {"concepts": np.zeros((5, 8), np.float32)}, signing_key)
    assert err.value.code == "manifest_invalid" and "5" in err.value.message
    with pytest.raises(TypeError, match="complex64"):
        write_packet(tmp_path / "p.m2kt", make_body(), {"concepts": np.zeros((4, 8), np.complex64)}, signing_key)
    assert list(tmp_path.iterdir()) == []


def test_open_packet_views_do_not_copy(tmp_path: Path, signing_key) -> None:
    written = write_packet(tmp_path / "p.m2kt", make_body(), make_tensors(), signing_key)
    buf = bytearray(written.path.read_bytes())
    packet = open_packet(buf)
    view = packet.tensors["concepts"]
    assert np.shares_memory(view, np.frombuffer(buf, np.uint8))
