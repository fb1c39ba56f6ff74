"""Issue 18, defects 5 and 6: hostile shapes and scaled concept rows, against the reader and real brokers.

Defect 5 — a zero-byte tensor (``data_offsets`` empty) may claim a shape whose element count no
reader can hold: ``[2**32, 2**32, 0]``, ``[2**64, 0]``, ``[0, 2**63]``. ``safetensors.safe_open``
refuses such a file and numpy cannot construct the array, so the format must refuse it too, with
the stable code ``bad_shape``: the SDK reader and verifier raise a ``PacketError``, the broker answers
400 and keeps nothing. The packets here are validly signed (the manifest's tensor table is
re-signed to agree), so the shape is the only thing wrong with them; the same construction with a
shape a reader can hold is accepted, and every packet accepted here opens with ``safe_open``.

Defect 6 — a concept row equal to ``s·(flagged direction)`` must be refused as ``safety_flagged``
whatever ``s`` and whatever float dtype the packet carries: the cosine is computed in float64 from
the row's own values, without overflow (``1e39`` in F64, ``1e38`` in BF16) or underflow (``1e-46``,
``1e-300``, ``1e-36`` in BF16), while a harmless row orthogonal to the direction is still accepted.

Both run against the Postgres + S3 broker (``live_broker``) and the embedded default
(``m2kt broker serve`` with nothing configured: SQLite and local blobs), each served by uvicorn.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sqlite3
import struct
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import ml_dtypes
import numpy as np
import pytest
from safetensors import SafetensorError, safe_open
from sqlalchemy import func, select

from m2kt.benchmarks.harness.brokers import BrokerProcess, Node, register_node
from m2kt.benchmarks.harness.packets import make_body, make_tensors
from m2kt.benchmarks.harness.services import S3Server
from m2kt.broker.models import Packet as PacketRow
from m2kt.broker.validation import FlaggedSet, SafetyReport, flagged_similarity, unit_rows
from m2kt.format import (
    PacketError,
    StreamVerifier,
    open_packet,
    read_header,
    verify_packet,
    write_packet,
)
from m2kt.format.keys import SigningKey
from m2kt.format.manifest import canonical_json
from tests.conftest import LiveBroker

EMPTY = "empty"  # the zero-byte tensor whose shape the hostile packets change (an F64 one sits at [0, 0])

# (dtype, shape): zero bytes each, but more elements than any reader can hold
HOSTILE_SHAPES: list[tuple[str, list[int]]] = [
    ("F64", [2**32, 2**32, 0]),  # the example: the running product passes 2**64
    ("F64", [2**64, 0]),  # one dimension past u64
    ("F64", [0, 2**63]),  # one dimension past i64, after a zero
    ("U8", [2**63, 0]),
    ("F64", [2**60, 0]),  # 2**63 bytes: numpy's limit is 2**63 - 1
    ("F64", [2**31, 2**31, 0]),
    ("F64", [0, 2**40, 2**40]),  # the zero first: numpy still multiplies the rest
    ("U8", [2**62, 2, 0]),
    ("BF16", [2**62, 0]),
    ("I32", [2**20] * 7 + [0]),
]
# (dtype, shape, code): dimensions of thousands of digits, whose product has more digits than Python
# will print; refused with a code, never with the ValueError that printing it would raise
GIANT_DIGITS: list[tuple[str, list[int], str]] = [
    ("F64", [10**4000, 10**4000], "bad_offsets"),  # no zero: the (empty) offsets cannot match
    ("F64", [10**4000, 10**4000, 0], "bad_shape"),
]
# (dtype, shape): zero bytes, as large as numpy and safetensors still accept, and ordinary ones
ACCEPTED_SHAPES: list[tuple[str, list[int]]] = [
    ("F64", [0]),  # the packet as written
    ("F64", [3, 0, 5]),
    ("F64", [2**60 - 1, 0]),  # (2**60 - 1) * 8 = 2**63 - 8 bytes
    ("U8", [2**63 - 1, 0]),
    ("U8", [0, 2**62, 1]),
]


# ----------------------------------------------------------------------------- building packets


def write_with_empty(tmp: Path, key: SigningKey, dtype: str, *, topic: str) -> bytes:
    """A valid packet whose tensors include a zero-byte tensor of ``dtype``."""
    numpy_dtype = {"F64": np.float64, "U8": np.uint8, "BF16": ml_dtypes.bfloat16, "I32": np.int32}[dtype]
    tensors = {**make_tensors(seed=1), EMPTY: np.zeros((0,), numpy_dtype)}
    path = tmp / f"{uuid.uuid4().hex}.m2kt"
    write_packet(path, make_body(topic=topic), tensors, key)
    data = path.read_bytes()
    path.unlink()
    return data


def with_shape(data: bytes, key: SigningKey, name: str, shape: list[int]) -> bytes:
    """The packet with tensor ``name`` given ``shape`` (offsets kept), the manifest re-signed to agree.

    Everything but the shape stays valid: the header is canonical, the signature verifies, the data
    digest is unchanged (the data section is not touched)."""
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + n])
    manifest = json.loads(header["__metadata__"]["m2kt.manifest"])
    header[name]["shape"] = shape
    for entry in manifest["tensors"]:
        if entry["name"] == name:
            entry["shape"] = shape
    manifest_bytes = canonical_json(manifest)
    header["__metadata__"] = {
        "m2kt.manifest": manifest_bytes.decode("utf-8"),
        "m2kt.signature": base64.b64encode(key.sign(manifest_bytes)).decode("ascii"),
    }
    raw = canonical_json(header)
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def shaped_packet(tmp: Path, key: SigningKey, dtype: str, shape: list[int], *, topic: str = "hardening.shape") -> bytes:
    return with_shape(write_with_empty(tmp, key, dtype, topic=topic), key, EMPTY, shape)


# ----------------------------------------------------------------------------- defect 5: the reader


@pytest.mark.parametrize(("dtype", "shape"), HOSTILE_SHAPES, ids=[f"{d}{s}" for d, s in HOSTILE_SHAPES])
def test_reader_refuses_shapes_no_reader_can_hold(
    tmp_path: Path, signing_key: SigningKey, dtype: str, shape: list[int]
) -> None:
    data = shaped_packet(tmp_path, signing_key, dtype, shape)
    path = tmp_path / "hostile.m2kt"
    path.write_bytes(data)
    assert_refused(path, data, signing_key, "bad_shape")
    # what the format promises to be compatible with refuses it too
    with pytest.raises((SafetensorError, ValueError)):  # safetensors' own refusal, or numpy's
        with safe_open(str(path), "numpy") as f:
            f.get_tensor(EMPTY)


@pytest.mark.parametrize(("dtype", "shape", "code"), GIANT_DIGITS, ids=["no-zero", "with-zero"])
def test_reader_refuses_dimensions_of_thousands_of_digits(
    tmp_path: Path, signing_key: SigningKey, dtype: str, shape: list[int], code: str
) -> None:
    data = shaped_packet(tmp_path, signing_key, dtype, shape)
    path = tmp_path / "digits.m2kt"
    path.write_bytes(data)
    assert_refused(path, data, signing_key, code)


def _tensors(source: Path | bytes) -> dict[str, np.ndarray]:
    with open_packet(source) as packet:
        return {name: np.array(t) for name, t in packet.tensors.items()}


def assert_refused(path: Path, data: bytes, key: SigningKey, code: str) -> None:
    """Every way the SDK reads a packet raises a PacketError with ``code`` (a 400 at the broker)."""
    refusals = {
        "open_packet(path)": lambda: _tensors(path),
        "open_packet(bytes)": lambda: _tensors(data),
        "verify_packet(path)": lambda: verify_packet(path, key.verify_key),
        "verify_packet(bytes)": lambda: verify_packet(data, key.verify_key),
        "read_header": lambda: read_header(path),
        "StreamVerifier": lambda: StreamVerifier().feed(data),
    }
    for what, call in refusals.items():
        with pytest.raises(PacketError) as caught:
            call()
        assert caught.value.code == code, (what, caught.value)
        assert caught.value.kind == "malformed", what


@pytest.mark.parametrize(("dtype", "shape"), ACCEPTED_SHAPES, ids=[f"{d}{s}" for d, s in ACCEPTED_SHAPES])
def test_reader_accepts_shapes_readers_can_hold(
    tmp_path: Path, signing_key: SigningKey, dtype: str, shape: list[int]
) -> None:
    """The control: the same re-signing with a holdable shape is accepted, and constructible everywhere."""
    data = shaped_packet(tmp_path, signing_key, dtype, shape)
    path = tmp_path / "ok.m2kt"
    path.write_bytes(data)
    verify_packet(path, signing_key.verify_key)
    verify_packet(data, signing_key.verify_key)
    stream = StreamVerifier()
    stream.feed(data)
    stream.finish()
    with open_packet(path) as packet:
        packet.verify(signing_key.verify_key)
        tensors = {name: np.array(t) for name, t in packet.tensors.items()}  # every tensor is constructible
    assert tensors[EMPTY].shape == tuple(shape) and tensors[EMPTY].size == 0
    assert tensors["concepts"].shape == (4, 8)
    assert _tensors(data).keys() == tensors.keys()
    assert_safetensors_opens(path, tensors)


def assert_safetensors_opens(path: Path, expected: dict[str, np.ndarray] | None = None) -> None:
    """``safetensors.safe_open`` opens the packet and returns every tensor (equal to the SDK's, if given)."""
    with safe_open(str(path), "numpy") as f:
        names = set(f.keys())
        got = {name: f.get_tensor(name) for name in names}
    assert "concepts" in names
    if expected is not None:
        assert names == set(expected)
        for name, array in expected.items():
            assert got[name].shape == array.shape and got[name].dtype == array.dtype, name
            np.testing.assert_array_equal(got[name], array)


# ----------------------------------------------------------------------------- brokers


@dataclass
class Target:
    """A running broker and how to see what it stores."""

    url: str
    admin_token: str
    rows: Callable[[], int]  # packet rows in the database
    blobs: Callable[[], set[str]]  # stored objects or files (packets, staged uploads), unfinished multipart uploads

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.admin_token}"}, timeout=60)


def _postgres_target(live_broker: LiveBroker, s3_server: S3Server) -> Target:
    def rows() -> int:
        with live_broker.state.sessions() as session:  # type: ignore[attr-defined]
            return session.scalar(select(func.count()).select_from(PacketRow)) or 0

    def blobs() -> set[str]:
        client = s3_server.client()
        keys = {
            obj["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=live_broker.bucket)
            for obj in page.get("Contents", [])
        }
        uploads = client.list_multipart_uploads(Bucket=live_broker.bucket).get("Uploads", [])
        return keys | {f"unfinished:{u['Key']}" for u in uploads}

    return Target(live_broker.url, live_broker.admin_token, rows, blobs)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """``m2kt broker serve`` with nothing configured: SQLite and blobs under ./m2kt-data."""
    cwd = tmp_path_factory.mktemp("embedded")
    env = {k: "" for k in os.environ if k.startswith("M2KT_") and not k.startswith("M2KT_TEST_")}
    process = BrokerProcess(env, cwd=cwd, log_path=cwd / "broker.log").start()
    data_dir = cwd / "m2kt-data"

    def rows() -> int:
        with sqlite3.connect(data_dir / "m2kt.db") as conn:
            return conn.execute("select count(*) from packets").fetchone()[0]

    def blobs() -> set[str]:
        root = data_dir / "blobs"
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}

    try:
        yield Target(process.url, (data_dir / "admin-token").read_text().strip(), rows, blobs)
    finally:
        process.stop()


@pytest.fixture(params=["postgres_s3", "embedded"])
def broker(request: pytest.FixtureRequest) -> Target:
    if request.param == "embedded":
        return request.getfixturevalue("embedded")
    return _postgres_target(request.getfixturevalue("live_broker"), request.getfixturevalue("s3_server"))


def upload(node: Node, topic: str, data: bytes) -> httpx.Response:
    return node.http.post(
        f"/v1/topics/{topic}/packets", content=data, headers={"Content-Type": "application/octet-stream"}
    )


def test_broker_refuses_hostile_shapes_and_keeps_nothing(broker: Target, tmp_path: Path) -> None:
    teacher = register_node(broker.url, broker.admin_token, "teacher")
    assert teacher.key is not None
    topic = f"hardening.shape-{uuid.uuid4().hex[:8]}"
    rows, blobs = broker.rows(), broker.blobs()
    hostile = [(d, s, "bad_shape") for d, s in HOSTILE_SHAPES] + GIANT_DIGITS
    for dtype, shape, code in hostile:
        r = upload(teacher, topic, shaped_packet(tmp_path, teacher.key, dtype, shape, topic=topic))
        assert r.status_code == 400, (dtype, str(shape)[:80], r.status_code, r.text[:300])
        assert r.json()["code"] == code, (dtype, str(shape)[:80], r.text[:300])
    assert broker.rows() == rows
    assert broker.blobs() == blobs
    assert httpx.get(f"{broker.url}/healthz", timeout=10).status_code == 200

    # the control: the same construction with shapes a reader can hold is stored, and opens anywhere
    for dtype, shape in ACCEPTED_SHAPES:
        data = shaped_packet(tmp_path, teacher.key, dtype, shape, topic=topic)
        r = upload(teacher, topic, data)
        assert r.status_code == 201, (dtype, shape, r.text)
        packet_id = hashlib.sha256(data).hexdigest()
        assert r.json()["id"] == packet_id
        fetched = tmp_path / f"{packet_id}.m2kt"
        fetched.write_bytes(teacher.http.get(f"/v1/packets/{packet_id}/blob").content)
        assert fetched.read_bytes() == data
        tensors = _tensors(fetched)
        assert tensors[EMPTY].shape == tuple(shape)
        assert_safetensors_opens(fetched, tensors)
    assert broker.rows() == rows + len(ACCEPTED_SHAPES)


# ----------------------------------------------------------------------------- defect 6: scaled concept rows

D = 24  # a concept width of its own on the shared broker (the set is deleted after): other uploads are untouched
K = 4
THRESHOLD = 0.99  # near-exact: the cosine of a scaled copy must come out as 1, not merely "large"


def _direction() -> np.ndarray:
    v = np.random.default_rng(18).standard_normal(D)
    return v / np.linalg.norm(v)


def _orthogonal_rows(direction: np.ndarray, count: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, D))
    rows -= np.outer(rows @ direction, direction)
    return rows / np.abs(rows).max(axis=1, keepdims=True)


# (dtype, scale of the flagged row): each is refused as safety_flagged
SCALED: list[tuple[str, float]] = [
    ("F64", 1e39),  # the example: inf in float32
    ("F64", 1e300),
    ("F64", 1e-46),  # 0 in float32
    ("F64", 1e-300),
    ("F64", 1.0),
    ("F32", 1e37),  # its squares overflow float32
    ("F32", 1e-30),  # below the old 1e-12 norm floor
    ("BF16", 1e38),
    ("BF16", 1e-36),
    ("F16", 6e4),
    ("F16", 1e-3),
]
NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


def _concepts(dtype: str, scale: float, flagged: bool, seed: int) -> np.ndarray:
    direction = _direction()
    rows = _orthogonal_rows(direction, K, seed) * scale
    if flagged:
        rows[1] = direction * scale
    out = rows.astype(NUMPY[dtype])
    assert np.isfinite(out.astype(np.float64)).all() and (np.abs(out.astype(np.float64)).max(axis=1) > 0).all()
    return out


def _concept_packet(tmp: Path, key: SigningKey, topic: str, concepts: np.ndarray) -> bytes:
    path = tmp / f"{uuid.uuid4().hex}.m2kt"
    write_packet(path, make_body(k=K, d=D, topic=topic), {"concepts": concepts}, key)
    data = path.read_bytes()
    path.unlink()
    return data


def test_flagged_similarity_is_exact_for_every_scale_and_dtype(signing_key: SigningKey, tmp_path: Path) -> None:
    """The broker's check itself, without HTTP: every scaled copy is found, nothing orthogonal is."""
    direction = _direction()
    sets = [FlaggedSet("issue18", ["bad"], unit_rows(direction[None, :]), THRESHOLD)]
    for dtype, scale in SCALED:
        for flagged in (True, False):
            concepts = _concepts(dtype, scale, flagged, seed=3)
            with open_packet(_concept_packet(tmp_path, signing_key, "hardening.unit", concepts)) as packet:
                report = SafetyReport(threshold=0.8, declared_max=0.0)
                flagged_similarity(report, packet.header, packet.tensors["concepts"], sets)
            hits = [(f["concept"], f["similarity"]) for f in report.flagged]
            if flagged:
                assert [c for c, _ in hits] == ["op:1"], (dtype, scale, hits)
                assert hits[0][1] >= THRESHOLD, (dtype, scale, hits)
            else:
                assert hits == [], (dtype, scale, hits)
    unit = unit_rows(np.array([[1e308, -1e308], [5e-324, 0.0], [0.0, 0.0]]))
    np.testing.assert_allclose(unit, [[2**-0.5, -(2**-0.5)], [1.0, 0.0], [0.0, 0.0]])
    assert unit.dtype == np.float64


def test_broker_refuses_scaled_copies_of_a_flagged_direction(broker: Target, tmp_path: Path) -> None:
    teacher = register_node(broker.url, broker.admin_token, "teacher")
    assert teacher.key is not None
    topic = f"hardening.flagged-{uuid.uuid4().hex[:8]}"
    name = f"issue18-{uuid.uuid4().hex[:8]}"
    admin = broker.admin()
    r = admin.put(
        f"/v1/admin/flagged-concepts/{name}",
        json={"d_model": D, "labels": ["issue18"], "directions": [_direction().tolist()], "threshold": THRESHOLD},
    )
    assert r.status_code == 201, r.text
    try:
        rows = broker.rows()
        for i, (dtype, scale) in enumerate(SCALED):
            data = _concept_packet(tmp_path, teacher.key, topic, _concepts(dtype, scale, True, seed=i))
            r = upload(teacher, topic, data)
            assert r.status_code == 422, (dtype, scale, r.status_code, r.text)
            assert r.json()["code"] == "safety_flagged", (dtype, scale, r.text)
        assert broker.rows() == rows

        # harmless rows, orthogonal to the direction, at the same extreme scales: still accepted
        for dtype, scale in [("F64", 1e300), ("F64", 1e-300), ("BF16", 1e38), ("F32", 1.0)]:
            data = _concept_packet(tmp_path, teacher.key, topic, _concepts(dtype, scale, False, seed=99))
            r = upload(teacher, topic, data)
            assert r.status_code == 201, (dtype, scale, r.text)
            path = tmp_path / "harmless.m2kt"
            path.write_bytes(data)
            assert_safetensors_opens(path, _tensors(path))
        assert broker.rows() == rows + 4
    finally:
        assert admin.delete(f"/v1/admin/flagged-concepts/{name}").status_code == 204
