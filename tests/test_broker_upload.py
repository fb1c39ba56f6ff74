"""Uploads through a live broker (uvicorn on a socket, Postgres, S3): what is accepted, what is
refused with which status and code, and that a refusal leaves nothing behind."""

from __future__ import annotations

import base64
import hashlib
import struct
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import func, select

from m2kt.benchmarks.harness.brokers import Node, register_node, unique
from m2kt.benchmarks.harness.packets import make_tensors, packet_bytes
from m2kt.broker.models import AuditEvent, Packet
from m2kt.broker.services.upload import blob_key
from m2kt.format.header import encode_header as _header_bytes
from m2kt.format.key_proof import prove_key
from m2kt.format.keys import SigningKey
from m2kt.sdk import calls
from m2kt.format.manifest import Manifest
from tests.conftest import LiveBroker, start_live_broker


@pytest.fixture(scope="module")
def teacher(live_broker: LiveBroker) -> Node:
    return register_node(live_broker.url, live_broker.admin_token, "teacher")


@pytest.fixture(scope="module")
def student(live_broker: LiveBroker) -> Node:
    return register_node(live_broker.url, live_broker.admin_token, "student", with_key=False)


def leftovers(broker: LiveBroker) -> tuple[int, list[str]]:
    """Rows in the packets table, and every blob key in storage."""
    with broker.state.sessions() as session:  # type: ignore[attr-defined]
        rows = session.scalar(select(func.count()).select_from(Packet)) or 0
    keys = [b.key for b in broker.state.storage.list("")]  # type: ignore[attr-defined]
    return rows, keys


def assert_nothing_left(broker: LiveBroker, before: tuple[int, list[str]], packet_id: str | None = None) -> None:
    rows, keys = leftovers(broker)
    assert rows == before[0], "a refused upload wrote a row"
    assert sorted(keys) == sorted(before[1]), f"a refused upload left blobs: {set(keys) - set(before[1])}"
    if packet_id:
        with broker.state.sessions() as session:  # type: ignore[attr-defined]
            assert session.get(Packet, packet_id) is None


def upload(node: Node, topic: str, data: bytes) -> httpx.Response:
    return node.http.post(
        f"/v1/topics/{topic}/packets", content=data, headers={"Content-Type": "application/octet-stream"}
    )


def test_upload_then_fetch_round_trip(live_broker: LiveBroker, teacher: Node, student: Node, tmp_path: Path) -> None:
    topic = unique("arith")
    data = packet_bytes(tmp_path, teacher.key, topic)
    r = upload(teacher, topic, data)
    assert r.status_code == 201, r.text
    record = r.json()
    packet_id = hashlib.sha256(data).hexdigest()
    assert record["id"] == packet_id and record["status"] == "accepted" and record["size"] == len(data)
    assert record["publisher"] == teacher.name and record["key_fingerprint"] == teacher.key.fingerprint
    assert record["safety"]["verdict"] == "pass" and record["manifest"]["topic"] == topic

    again = upload(teacher, topic, data)
    assert again.status_code == 200 and again.json() == record  # the same packet is the same record

    assert student.http.get(f"/v1/packets/{packet_id}").json() == record
    blob = student.http.get(f"/v1/packets/{packet_id}/blob")
    assert blob.status_code == 200 and blob.content == data and blob.headers["etag"] == f'"{packet_id}"'
    part = student.http.get(f"/v1/packets/{packet_id}/blob", headers={"Range": "bytes=8-15"})
    assert part.status_code == 206 and part.content == data[8:16]
    assert part.headers["content-range"] == f"bytes 8-15/{len(data)}"
    tail = student.http.get(f"/v1/packets/{packet_id}/blob", headers={"Range": "bytes=-4"})
    assert tail.content == data[-4:]
    bad = student.http.get(f"/v1/packets/{packet_id}/blob", headers={"Range": f"bytes={len(data)}-"})
    assert bad.status_code == 416
    redirect = student.http.get(f"/v1/packets/{packet_id}/blob", params={"redirect": 1})
    assert redirect.status_code == 307
    assert httpx.get(redirect.headers["location"]).content == data  # presigned: no broker token needed

    events = student.http.get(f"/v1/topics/{topic}/packets").json()
    assert [(e["seq"], e["kind"], e["packet"]["id"]) for e in events["items"]] == [(1, "published", packet_id)]


MiB = 1 << 20


def key_of(data: bytes) -> str:
    """The storage key of these packet bytes: the data digest the manifest claims, the header's digest."""
    (n,) = struct.unpack("<Q", data[:8])
    import json

    claimed = Manifest.model_validate_json(json.loads(data[8 : 8 + n])["__metadata__"]["m2kt.manifest"]).data_sha256
    return blob_key(claimed, hashlib.sha256(data[: 8 + n]).hexdigest())


def pending_uploads(broker: LiveBroker, key: str) -> list[str]:
    """Unfinished S3 multipart uploads on ``key``."""
    storage = broker.state.storage  # type: ignore[attr-defined]
    uploads = storage.client.list_multipart_uploads(Bucket=storage.bucket).get("Uploads", [])
    return [u["UploadId"] for u in uploads if u["Key"] == storage.prefix + key]


def big_packet(tmp: Path, node: Node, topic: str, mib: int = 12) -> bytes:
    """Several 5 MiB parts in the live broker's storage."""
    rng = np.random.default_rng(11)
    tensors = {**make_tensors(), "attention": rng.random((mib * MiB // 4 // 1024, 1024), dtype=np.float32)}
    return packet_bytes(tmp, node.key, topic, tensors=tensors)


def test_multipart_upload_goes_straight_to_its_final_key_once(
    live_broker: LiveBroker, teacher: Node, tmp_path: Path
) -> None:
    topic = unique("big")
    data = big_packet(tmp_path, teacher, topic)
    packet_id = hashlib.sha256(data).hexdigest()
    key = key_of(data)
    r = upload(teacher, topic, data)
    assert r.status_code == 201, r.text
    with live_broker.state.sessions() as session:  # type: ignore[attr-defined]
        row = session.get(Packet, packet_id)
        assert row is not None and row.storage_key == key
    storage = live_broker.state.storage  # type: ignore[attr-defined]
    assert [b.key for b in storage.list(key.split("-")[0])] == [key]  # no copy, nothing in incoming/
    assert [b.key for b in storage.list("incoming/")] == []
    assert pending_uploads(live_broker, key) == []

    again = upload(teacher, topic, data)  # the same bytes to the same key: one blob, the same record
    assert (again.status_code, again.json()) == (200, r.json())
    assert [b.key for b in storage.list(key.split("-")[0])] == [key]
    assert pending_uploads(live_broker, key) == []
    assert teacher.http.get(f"/v1/packets/{packet_id}/blob").content == data


@pytest.mark.parametrize(
    "case",
    [
        pytest.param("flip-data", id="bad-digest-found-at-the-end"),
        pytest.param("truncated", id="body-ends-early"),
    ],
)
def test_refused_multipart_upload_leaves_no_blob_and_no_unfinished_upload(
    live_broker: LiveBroker, teacher: Node, tmp_path: Path, case: str
) -> None:
    topic = unique("bigrefuse")
    good = big_packet(tmp_path, teacher, topic)
    data = good[:-1] + bytes([good[-1] ^ 1]) if case == "flip-data" else good[: -3 * MiB]
    before = leftovers(live_broker)
    r = upload(teacher, topic, data)
    expected = (422, "digest_mismatch") if case == "flip-data" else (400, "truncated")
    assert (r.status_code, r.json()["code"]) == expected, r.text
    assert_nothing_left(live_broker, before, hashlib.sha256(data).hexdigest())
    assert pending_uploads(live_broker, key_of(good)) == []


def test_reupload_of_a_packet_stored_under_the_older_key_keeps_one_blob(
    live_broker: LiveBroker, teacher: Node, tmp_path: Path
) -> None:
    """Rows written before blobs were named by their digests point at ``packets/<id>.m2kt``."""
    topic = unique("oldkey")
    data = packet_bytes(tmp_path, teacher.key, topic, seed=5)
    packet_id = hashlib.sha256(data).hexdigest()
    assert upload(teacher, topic, data).status_code == 201
    storage = live_broker.state.storage  # type: ignore[attr-defined]
    old_key = f"packets/{packet_id}.m2kt"
    staged = storage.stage(old_key)
    staged.write(data)
    staged.complete()
    storage.promote(staged.staging_key, old_key)
    with live_broker.state.sessions.begin() as session:  # type: ignore[attr-defined]
        row = session.get(Packet, packet_id)
        row.storage_key = old_key
    storage.delete(key_of(data))

    r = upload(teacher, topic, data)
    assert r.status_code == 200, r.text
    assert storage.exists(old_key) and not storage.exists(key_of(data))
    assert teacher.http.get(f"/v1/packets/{packet_id}/blob").content == data


def _resign(data: bytes, key: SigningKey, *, manifest_changes: dict | None = None, data_changes=None) -> bytes:
    """Re-sign a packet after changing its manifest or data (a signer producing a bad packet)."""
    (n,) = struct.unpack("<Q", data[:8])
    import json

    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    manifest = Manifest.model_validate_json(meta["m2kt.manifest"])
    body = bytearray(data[8 + n :])
    if data_changes:
        data_changes(body, manifest)
    fields = {**manifest.model_dump(), "data_sha256": hashlib.sha256(body).hexdigest(), **(manifest_changes or {})}
    new = Manifest(**fields)
    mb = new.to_bytes()
    header = _header_bytes(mb, key.sign(mb), new.tensors)
    return struct.pack("<Q", len(header)) + header + bytes(body)


def _nan_in_traces(body: bytearray, manifest: Manifest) -> None:
    spec = next(t for t in manifest.tensors if t.name == "traces")
    body[spec.data_offsets[0] : spec.data_offsets[0] + 2] = np.array([np.nan], np.float16).tobytes()


@pytest.fixture(scope="module")
def flagged_direction(live_broker: LiveBroker) -> np.ndarray:
    rng = np.random.default_rng(42)
    direction = rng.standard_normal(8)
    r = live_broker.admin().put(
        "/v1/admin/flagged-concepts/test-harm",
        json={"d_model": 8, "labels": ["harm"], "directions": [direction.tolist()], "threshold": 0.95},
    )
    assert r.status_code in (200, 201), r.text
    return direction


REFUSALS = [
    # id, how to build the body from (good packet bytes, teacher, other), expected status, expected code
    pytest.param("garbage", 413, "header_too_large", id="not-a-packet"),
    pytest.param("truncated", 400, "truncated", id="truncated-body"),
    pytest.param("trailing", 400, "trailing_bytes", id="trailing-bytes"),
    pytest.param("flip-data", 422, "digest_mismatch", id="bad-digest"),
    pytest.param("forged-signature", 422, "signature_invalid", id="bad-signature"),
    pytest.param("unknown-key", 422, "unknown_key", id="unknown-key"),
    pytest.param("revoked-key", 422, "key_revoked", id="revoked-key"),
    pytest.param("others-key", 422, "key_not_owned", id="key-of-another-node"),
    pytest.param("topic-mismatch", 422, "topic_mismatch", id="topic-mismatch"),
    pytest.param("declared-unsafe", 422, "safety_declared", id="declared-safety-score"),
    pytest.param("flagged-concept", 422, "safety_flagged", id="near-flagged-direction"),
    pytest.param("nan", 422, "non_finite", id="signed-nan"),
]


@pytest.mark.parametrize(("case", "status", "code"), REFUSALS)
def test_refusals_leave_nothing_behind(
    live_broker: LiveBroker,
    teacher: Node,
    flagged_direction: np.ndarray,
    tmp_path: Path,
    case: str,
    status: int,
    code: str,
) -> None:
    topic = unique("refuse")
    good = packet_bytes(tmp_path, teacher.key, topic)
    if case == "garbage":
        data = b"\xff" * 4096
    elif case == "truncated":
        data = good[:-5]
    elif case == "trailing":
        data = good + b"\x00"
    elif case == "flip-data":
        data = good[:-1] + bytes([good[-1] ^ 1])
    elif case == "forged-signature":
        other = SigningKey.generate()
        (n,) = struct.unpack("<Q", good[:8])
        import json

        meta = json.loads(good[8 : 8 + n])["__metadata__"]
        forged = base64.b64encode(other.sign(meta["m2kt.manifest"].encode())).decode()
        data = good.replace(meta["m2kt.signature"].encode(), forged.encode())
    elif case == "unknown-key":
        data = packet_bytes(tmp_path, SigningKey.generate(), topic)
    elif case == "revoked-key":
        extra = SigningKey.generate()
        proof = calls.register_key(prove_key(extra, teacher.name)).json
        assert teacher.http.post("/v1/keys", json=proof).status_code == 201
        assert teacher.http.post(f"/v1/keys/{extra.fingerprint}/revoke", json={"reason": "test"}).status_code == 200
        data = packet_bytes(tmp_path, extra, topic)
    elif case == "others-key":
        other = register_node(live_broker.url, live_broker.admin_token, "teacher")
        data = packet_bytes(tmp_path, other.key, topic)
    elif case == "topic-mismatch":
        data = packet_bytes(tmp_path, teacher.key, unique("elsewhere"))
    elif case == "declared-unsafe":
        from m2kt.format.manifest import ConceptEntry

        concepts = [
            ConceptEntry(id=f"c{i}", label="x", kind="named", safety_score=0.9 if i == 2 else 0.0) for i in range(4)
        ]
        data = packet_bytes(tmp_path, teacher.key, topic, concepts=concepts)
    elif case == "flagged-concept":
        tensors = make_tensors()
        tensors["concepts"][1] = (flagged_direction * 3).astype(np.float32)
        data = packet_bytes(tmp_path, teacher.key, topic, tensors=tensors)
    elif case == "nan":
        data = _resign(good, teacher.key, data_changes=_nan_in_traces)
    else:  # pragma: no cover
        raise AssertionError(case)
    before = leftovers(live_broker)
    r = upload(teacher, topic, data)
    assert (r.status_code, r.json()["code"]) == (status, code), r.text
    assert r.json()["message"]
    assert_nothing_left(live_broker, before, hashlib.sha256(data).hexdigest())
    with live_broker.state.sessions() as session:  # type: ignore[attr-defined]
        logged = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "packet.refused", AuditEvent.target == topic)
        ).all()
        assert [e.detail["code"] for e in logged] == [code]


@pytest.mark.parametrize(
    ("who", "topic", "status", "code"),
    [
        pytest.param(None, "t", 401, "missing_token", id="no-token"),
        pytest.param("bogus", "t", 401, "invalid_token", id="unknown-token"),
        pytest.param("student", "t", 403, "insufficient_scope", id="student-cannot-publish"),
        pytest.param("scoped", "other.topic", 403, "insufficient_scope", id="teacher-outside-its-topics"),
        pytest.param("teacher", "Bad Topic!", 400, "invalid_topic", id="invalid-topic-name"),
    ],
)
def test_upload_auth_and_topic_refusals(
    live_broker: LiveBroker,
    teacher: Node,
    student: Node,
    tmp_path: Path,
    who: str | None,
    topic: str,
    status: int,
    code: str,
) -> None:
    headers = {}
    if who == "bogus":
        headers["Authorization"] = "Bearer m2kt_nope"
    elif who == "student":
        headers["Authorization"] = f"Bearer {student.token}"
    elif who == "teacher":
        headers["Authorization"] = f"Bearer {teacher.token}"
    elif who == "scoped":
        scoped = register_node(
            live_broker.url, live_broker.admin_token, "teacher", scopes=["read", "keys", "publish:arith.*"]
        )
        headers["Authorization"] = f"Bearer {scoped.token}"
    before = leftovers(live_broker)
    r = httpx.post(
        f"{live_broker.url}/v1/topics/{topic}/packets",
        content=packet_bytes(tmp_path, teacher.key, "t"),
        headers=headers,
    )
    assert (r.status_code, r.json()["code"]) == (status, code), r.text
    assert_nothing_left(live_broker, before)


def test_too_large_is_413_and_leaves_nothing(live_broker: LiveBroker, teacher: Node, s3_server, tmp_path: Path) -> None:
    token, _, server = start_live_broker(
        live_broker.state.settings.database_url,
        s3_server,  # type: ignore[attr-defined]
        live_broker.bucket,
        tmp_path,
        token=live_broker.admin_token,
        max_packet_bytes=2048,
    )
    topic = unique("big")
    data = packet_bytes(tmp_path, teacher.key, topic, tensors={**make_tensors(), "pad": np.zeros(4096, np.uint8)})
    with server as url:
        before = leftovers(live_broker)
        r = httpx.post(
            f"{url}/v1/topics/{topic}/packets", content=data, headers={"Authorization": f"Bearer {teacher.token}"}
        )
        assert (r.status_code, r.json()["code"]) == (413, "packet_too_large")

        def chunked():  # no Content-Length: the limit is enforced while streaming
            yield data[:1000]
            yield data[1000:]

        r = httpx.post(
            f"{url}/v1/topics/{topic}/packets", content=chunked(), headers={"Authorization": f"Bearer {teacher.token}"}
        )
        assert (r.status_code, r.json()["code"]) == (413, "packet_too_large")
        assert_nothing_left(live_broker, before)


def test_quarantine_policy_stores_but_does_not_serve(
    live_broker: LiveBroker, teacher: Node, student: Node, s3_server, tmp_path: Path
) -> None:
    _, _, server = start_live_broker(
        live_broker.state.settings.database_url,
        s3_server,  # type: ignore[attr-defined]
        live_broker.bucket,
        tmp_path,
        token=live_broker.admin_token,
        safety_action="quarantine",
    )
    from m2kt.format.manifest import ConceptEntry

    topic = unique("quar")
    concepts = [ConceptEntry(id=f"c{i}", label="x", kind="named", safety_score=0.99) for i in range(4)]
    data = packet_bytes(tmp_path, teacher.key, topic, concepts=concepts)
    packet_id = hashlib.sha256(data).hexdigest()
    with server as url:
        r = httpx.post(
            f"{url}/v1/topics/{topic}/packets", content=data, headers={"Authorization": f"Bearer {teacher.token}"}
        )
        assert r.status_code == 201 and r.json()["status"] == "quarantined", r.text
        assert r.json()["safety"]["action"] == "quarantined" and r.json()["safety"]["over_threshold"] == [
            "c0",
            "c1",
            "c2",
            "c3",
        ]
    blob = student.http.get(f"/v1/packets/{packet_id}/blob")
    assert (blob.status_code, blob.json()["code"]) == (403, "packet_quarantined")
    assert student.http.get(f"/v1/topics/{topic}/packets").json()["items"] == []  # nothing published
    admin = live_broker.admin()
    assert admin.get(f"/v1/packets/{packet_id}/blob").content == data
    assert admin.post(f"/v1/packets/{packet_id}/release").json()["status"] == "accepted"
    events = student.http.get(f"/v1/topics/{topic}/packets").json()["items"]
    assert [(e["kind"], e["packet"]["id"]) for e in events] == [("published", packet_id)]
    assert student.http.get(f"/v1/packets/{packet_id}/blob").content == data


def test_revoking_a_key_revokes_its_packets_and_tells_subscribers(
    live_broker: LiveBroker, student: Node, tmp_path: Path
) -> None:
    teacher = register_node(live_broker.url, live_broker.admin_token, "teacher")
    topic = unique("rev")
    ids = []
    for seed in range(2):
        data = packet_bytes(tmp_path, teacher.key, topic, seed=seed)
        assert upload(teacher, topic, data).status_code == 201
        ids.append(hashlib.sha256(data).hexdigest())
    r = live_broker.admin().post(f"/v1/keys/{teacher.key.fingerprint}/revoke", json={"reason": "leaked"})
    assert r.status_code == 200 and r.json()["packets_revoked"] == 2 and r.json()["key"]["revoked_at"]
    events = student.http.get(f"/v1/topics/{topic}/packets").json()["items"]
    assert [(e["seq"], e["kind"], e["packet"]["id"]) for e in events] == [
        (1, "published", ids[0]),
        (2, "published", ids[1]),
        (3, "revoked", ids[0]),
        (4, "revoked", ids[1]),
    ]
    assert student.http.get(f"/v1/packets/{ids[0]}/blob").json()["code"] == "packet_revoked"
    again = upload(teacher, topic, packet_bytes(tmp_path, teacher.key, topic, seed=9))
    assert again.json()["code"] == "key_revoked"


def test_lineage_and_receipts(live_broker: LiveBroker, teacher: Node, student: Node, tmp_path: Path) -> None:
    topic = unique("lin")
    parent = packet_bytes(tmp_path, teacher.key, topic, seed=1)
    pid = upload(teacher, topic, parent).json()["id"]
    outside = "ab" * 32
    child = packet_bytes(tmp_path, teacher.key, topic, seed=2, parents=[pid, outside])
    cid = upload(teacher, topic, child).json()["id"]
    grandchild = packet_bytes(tmp_path, teacher.key, topic, seed=3, parents=[cid])
    gid = upload(teacher, topic, grandchild).json()["id"]

    lin = student.http.get(f"/v1/packets/{cid}/lineage").json()
    assert [(a["id"], a["depth"], a["known"]) for a in lin["ancestors"]] == sorted(
        [(pid, 1, True), (outside, 1, False)], key=lambda t: (t[1], t[0])
    )
    assert [(d["id"], d["depth"]) for d in lin["descendants"]] == [(gid, 1)]
    assert [a["id"] for a in student.http.get(f"/v1/packets/{gid}/lineage").json()["ancestors"]] == sorted(
        [cid]
    ) + sorted([pid, outside])

    r = student.http.post(f"/v1/packets/{cid}/receipts", json={"decision": "accepted", "scores": {"task": 0.93}})
    assert r.status_code == 201 and r.json()["node"] == student.name
    assert teacher.http.post(f"/v1/packets/{cid}/receipts", json={"decision": "accepted"}).status_code == 403
    assert [x["decision"] for x in student.http.get(f"/v1/packets/{cid}/receipts").json()] == ["accepted"]
