"""Issue 18's open points, decided (SECURITY.md says each), each on real brokers: who may register a key
(proof of possession), what a packet's parents and teacher node must be, what a withdrawn packet still
takes, what one node may create, what the key registry and listings show, and how the embedded default
keeps its files."""

from __future__ import annotations

import stat
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from m2kt.benchmarks.harness.brokers import unique
from m2kt.benchmarks.harness.packets import make_body, packet_bytes
from m2kt.format.key_proof import prove_key
from m2kt.format.keys import SigningKey
from m2kt.format.manifest import TeacherInfo
from m2kt.sdk import BrokerClient, calls
from tests.two_backends import BACKENDS, Broker, refusal, start_broker, upload  # noqa: F401 - start_broker is a fixture

# ------------------------------------------------------------------ key registration: proof of possession


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_key_is_registered_only_by_whoever_holds_it(start_broker: Callable[..., Broker], backend: str) -> None:
    """A student cannot squat a teacher's public key: registering needs the key's signature over the
    registration for the registering node, fresh; the teacher's own proof registers it for the teacher only."""
    broker = start_broker(backend)
    teacher = broker.node("teacher", with_key=False)
    student = broker.node("student", with_key=False)
    key = SigningKey.generate()
    public_only = {"public_key": key.verify_key.to_pem()}
    assert refusal(student.http.post("/v1/keys", json=public_only)) == (400, "proof_required")
    # The teacher's proof (made for the teacher) replayed by the student: it names another node.
    stolen = calls.register_key(prove_key(key, teacher.name)).json
    assert refusal(student.http.post("/v1/keys", json=stolen)) == (400, "invalid_proof")
    # A proof by another key, or an old one, or a garbled one, registers nothing.
    forged = calls.register_key(prove_key(SigningKey.generate(), student.name)).json | {
        "public_key": key.verify_key.to_pem()
    }
    assert refusal(student.http.post("/v1/keys", json=forged)) == (400, "invalid_proof")
    old = calls.register_key(prove_key(key, teacher.name, now=time.time() - 2 * 86400)).json
    assert refusal(teacher.http.post("/v1/keys", json=old)) == (400, "invalid_proof")
    assert refusal(teacher.http.post("/v1/keys", json=stolen | {"proof": "%%%"})) == (400, "invalid_proof")
    assert refusal(teacher.http.get(f"/v1/keys/{key.fingerprint}")) == (404, "key_not_found")

    assert teacher.http.post("/v1/keys", json=stolen).status_code == 201  # the rightful owner's own proof
    assert teacher.http.get(f"/v1/keys/{key.fingerprint}").json()["owner"] == teacher.name


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_admin_registers_a_nodes_key_from_that_nodes_proof(
    start_broker: Callable[..., Broker], backend: str
) -> None:
    broker = start_broker(backend)
    teacher = broker.node("teacher", with_key=False)
    key = SigningKey.generate()
    proof = prove_key(key, teacher.name)  # made on the teacher's machine: the private key stays there
    with BrokerClient(broker.url, broker.admin_token, quiet=True) as admin:
        record = admin.register_key(proof, owner=teacher.name)
    assert record.owner == teacher.name
    assert key.to_pem() not in proof.to_json()


# ------------------------------------------------------------------ what a packet may claim


@pytest.mark.parametrize("backend", BACKENDS)
def test_parents_must_not_be_withdrawn_and_the_teacher_node_must_be_the_uploader(
    start_broker: Callable[..., Broker], tmp_path: Path, backend: str
) -> None:
    broker = start_broker(backend)
    teacher = broker.node("teacher")
    topic = unique("lineage")
    parent = packet_bytes(tmp_path, teacher.key, topic, seed=1)
    parent_id = upload(teacher, topic, parent).json()["id"]
    outside = "cd" * 32  # a packet of another broker: lineage across brokers stays allowed (known: false)
    child = packet_bytes(tmp_path, teacher.key, topic, seed=2, parents=[parent_id, outside])
    assert upload(teacher, topic, child).status_code == 201

    assert broker.admin().post(f"/v1/packets/{parent_id}/quarantine").status_code == 200
    late = packet_bytes(tmp_path, teacher.key, topic, seed=3, parents=[parent_id])
    r = upload(teacher, topic, late)
    assert refusal(r) == (422, "parent_withdrawn") and "quarantined" in r.json()["message"]

    body = make_body(topic=topic, teacher=TeacherInfo(node="someone-else", model_name="m", architecture="a", d_model=8))
    claimed = packet_bytes(tmp_path, teacher.key, topic, seed=4, teacher=body.teacher)
    assert refusal(upload(teacher, topic, claimed)) == (422, "teacher_node_mismatch")
    honest = make_body(topic=topic, teacher=TeacherInfo(node=teacher.name, model_name="m", architecture="a", d_model=8))
    assert (
        upload(teacher, topic, packet_bytes(tmp_path, teacher.key, topic, seed=5, teacher=honest.teacher)).status_code
        == 201
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_admin_publishes_only_with_its_own_keys(
    start_broker: Callable[..., Broker], tmp_path: Path, backend: str
) -> None:
    broker = start_broker(backend)
    teacher = broker.node("teacher")
    topic = unique("admin.pub")
    data = packet_bytes(tmp_path, teacher.key, topic)
    assert refusal(broker.admin().post(f"/v1/topics/{topic}/packets", content=data)) == (422, "key_not_owned")


# ------------------------------------------------------------------ receipts


@pytest.mark.parametrize("backend", BACKENDS)
def test_receipts_on_withdrawn_packets_and_their_limits(
    start_broker: Callable[..., Broker], tmp_path: Path, backend: str
) -> None:
    broker = start_broker(backend, max_receipts_per_packet=3, max_receipt_bytes=4096)
    teacher, student = broker.node("teacher"), broker.node("student", with_key=False)
    topic = unique("receipts")
    pid = upload(teacher, topic, packet_bytes(tmp_path, teacher.key, topic)).json()["id"]
    post = lambda body: student.http.post(f"/v1/packets/{pid}/receipts", json=body)  # noqa: E731

    big = {"decision": "accepted", "report": {"log": "x" * 5000}}
    assert refusal(post(big)) == (413, "receipt_too_large")
    assert post({"decision": "accepted", "scores": {"task": 0.9}}).status_code == 201
    assert broker.admin().post(f"/v1/packets/{pid}/quarantine").status_code == 200
    r = post({"decision": "accepted"})
    assert refusal(r) == (409, "packet_withdrawn") and "rolled_back" in r.json()["message"]
    assert post({"decision": "rolled_back"}).status_code == 201  # a student says it undid it
    assert post({"decision": "rolled_back"}).status_code == 201
    assert refusal(post({"decision": "rolled_back"})) == (409, "too_many_receipts")
    decisions = [x["decision"] for x in broker.admin().get(f"/v1/packets/{pid}/receipts").json()]
    assert decisions == ["accepted", "rolled_back", "rolled_back"]
    # What a student needs to undo it stays visible; the packet itself is not served.
    assert refusal(student.http.get(f"/v1/packets/{pid}/blob")) == (403, "packet_quarantined")
    assert student.http.get(f"/v1/packets/{pid}/lineage").status_code == 200
    assert student.http.get(f"/v1/packets/{pid}/receipts").status_code == 200
    events = student.http.get(f"/v1/topics/{topic}/packets").json()["items"]
    assert [(e["kind"], e["packet"]["id"]) for e in events] == [("published", pid), ("quarantined", pid)]


# ------------------------------------------------------------------ what one node may create and list


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_node_caps_on_keys_topics_and_subscriptions(
    start_broker: Callable[..., Broker], tmp_path: Path, backend: str
) -> None:
    broker = start_broker(backend, max_keys_per_node=2, max_topics_per_node=2, max_subscriptions_per_node=3)
    teacher = broker.node("teacher")  # holds one key already
    student = broker.node("student", with_key=False)
    second, third = SigningKey.generate(), SigningKey.generate()
    assert (
        teacher.http.post("/v1/keys", json=calls.register_key(prove_key(second, teacher.name)).json).status_code == 201
    )
    r = teacher.http.post("/v1/keys", json=calls.register_key(prove_key(third, teacher.name)).json)
    assert refusal(r) == (409, "too_many_keys")
    assert teacher.http.post(f"/v1/keys/{second.fingerprint}/revoke", json={}).status_code == 200  # frees a place
    assert (
        teacher.http.post("/v1/keys", json=calls.register_key(prove_key(third, teacher.name)).json).status_code == 201
    )

    made = [unique("cap") for _ in range(3)]
    assert student.http.put("/v1/subscriptions/a", json={"topic": made[0]}).status_code == 201
    assert student.http.put("/v1/subscriptions/b", json={"topic": made[1]}).status_code == 201
    assert refusal(student.http.put("/v1/subscriptions/c", json={"topic": made[2]})) == (409, "too_many_topics")
    assert student.http.put("/v1/subscriptions/c", json={"topic": made[0]}).status_code == 201  # existing topic
    assert refusal(student.http.put("/v1/subscriptions/d", json={"topic": made[1]})) == (409, "too_many_subscriptions")
    r = upload(teacher, made[2], packet_bytes(tmp_path, teacher.key, made[2]))  # the teacher created none yet
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_key_registry_needs_read_or_keys_and_lists_page_by_page(
    start_broker: Callable[..., Broker], backend: str
) -> None:
    broker = start_broker(backend)
    student = broker.node("student")
    admin = broker.admin()
    (token,) = admin.get(f"/v1/nodes/{student.name}/tokens").json()
    narrow = admin.post(f"/v1/nodes/{student.name}/tokens", json={"scopes": ["receipt"]}).json()["token"]
    receipts_only = httpx.Client(base_url=broker.url, headers={"Authorization": f"Bearer {narrow}"})
    assert refusal(receipts_only.get("/v1/keys")) == (403, "insufficient_scope")
    assert refusal(receipts_only.get(f"/v1/keys/{student.key.fingerprint}")) == (403, "insufficient_scope")
    assert len(token["prefix"]) == 9  # "m2kt_" and 4 characters of the secret, no more

    for i in range(5):
        assert student.http.put(f"/v1/subscriptions/s{i}", json={"topic": unique("page")}).status_code == 201
    names = [t["name"] for t in student.http.get("/v1/topics", params={"limit": 1000}).json()]
    paged: list[str] = []
    while page := student.http.get("/v1/topics", params={"limit": 2, **({"after": paged[-1]} if paged else {})}).json():
        paged += [t["name"] for t in page]
    assert paged == names == sorted(names)
    with BrokerClient(broker.url, student.token, quiet=True) as client:
        assert [t.name for t in client.topics()] == names
        assert student.key.fingerprint in {k.fingerprint for k in client.keys()}
    keys = [k["fingerprint"] for k in student.http.get("/v1/keys").json()]
    first = student.http.get("/v1/keys", params={"limit": 1}).json()
    rest = student.http.get("/v1/keys", params={"after": first[0]["fingerprint"]}).json()
    assert [k["fingerprint"] for k in first + rest] == keys


# ------------------------------------------------------------------ the request guard and the embedded files


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_oversized_body_with_a_bad_token_gets_401_first(start_broker: Callable[..., Broker], backend: str) -> None:
    broker = start_broker(backend)
    huge = b'{"name": "' + b"x" * (2 << 20) + b'"}'
    r = httpx.post(
        f"{broker.url}/v1/nodes",
        content=huge,
        headers={"Authorization": "Bearer m2kt_" + "g" * 43, "Content-Type": "application/json"},
    )
    assert refusal(r) == (401, "invalid_token") and r.headers["WWW-Authenticate"] == "Bearer"
    r = broker.admin().post("/v1/nodes", content=huge, headers={"Content-Type": "application/json"})
    assert refusal(r) == (413, "body_too_large")


def test_the_embedded_defaults_files_are_private(start_broker: Callable[..., Broker], tmp_path: Path) -> None:
    broker = start_broker("embedded")
    teacher = broker.node("teacher")
    topic = unique("modes")
    assert upload(teacher, topic, packet_bytes(tmp_path, teacher.key, topic)).status_code == 201
    data_dir = Path(broker.state.settings.data_dir)
    database = data_dir / "m2kt.db"
    blobs = Path(broker.state.settings.effective_storage_url)
    assert stat.S_IMODE(database.stat().st_mode) == 0o600
    assert stat.S_IMODE(blobs.stat().st_mode) == 0o700
    for extra in ("m2kt.db-wal", "m2kt.db-shm"):
        if (data_dir / extra).exists():
            assert stat.S_IMODE((data_dir / extra).stat().st_mode) & 0o077 == 0, extra


def test_a_presigned_url_outlives_a_revocation_by_its_lifetime_only(
    start_broker: Callable[..., Broker], tmp_path: Path
) -> None:
    """Documented, not fixed: S3 serves a presigned URL until it expires, whatever the broker decided since.
    The default lifetime is 60 s; here 2 s, and the URL handed out before the revocation stops after it."""
    broker = start_broker("postgres", presign_ttl_seconds=2)
    teacher, student = broker.node("teacher"), broker.node("student", with_key=False)
    topic = unique("presign")
    data = packet_bytes(tmp_path, teacher.key, topic)
    pid = upload(teacher, topic, data).json()["id"]
    redirect = student.http.get(f"/v1/packets/{pid}/blob", params={"redirect": 1}, follow_redirects=False)
    assert redirect.status_code == 307, redirect.text
    url = redirect.headers["location"]
    assert teacher.http.post(f"/v1/keys/{teacher.key.fingerprint}/revoke", json={}).status_code == 200
    assert refusal(student.http.get(f"/v1/packets/{pid}/blob")) == (403, "packet_revoked")  # the broker: at once
    time.sleep(3)  # past the URL's lifetime (a wait, not a time limit: nothing asserts how long anything took)
    assert httpx.get(url).status_code == 403  # the storage: once the URL has expired
