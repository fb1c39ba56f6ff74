"""Issue 18's broken promises about credentials, races and refusals, on real brokers: uvicorn on a loopback
socket over Postgres + an S3 server (nanio), and over the embedded default (SQLite + a blob directory).

Each test names the promise it keeps (README.md / SECURITY.md) and tries the class of attack, not one example:
long-lived responses after a credential is withdrawn, a key revoked while its upload streams, concurrent
rotations and create-or-get requests, text a database cannot store, the storage quota, and what /readyz says.
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from m2kt.benchmarks.harness.brokers import Node, unique
from m2kt.benchmarks.harness.packets import make_tensors, packet_bytes
from m2kt.errors import VerificationError
from m2kt.format.key_proof import prove_key
from m2kt.format.keys import SigningKey
from m2kt.sdk import BrokerClient, calls
from tests.two_backends import BACKENDS, Broker, start_broker, upload  # noqa: F401 - start_broker is a fixture


def packet_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rows_of(broker: Broker, topic: str) -> list[str]:
    r = broker.admin().get(f"/v1/topics/{topic}/packets")
    return [] if r.status_code == 404 else [e["packet"]["id"] for e in r.json()["items"]]


# ------------------------------------------------------------------ 1. long-lived responses and credentials


class SseReader:
    """Reads an SSE stream in a thread; ``events`` are (event, data) pairs as they arrive."""

    def __init__(self, url: str, token: str, topic: str) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.ended = threading.Event()
        self._arrived = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(url, token, topic), daemon=True)
        self._thread.start()

    def _run(self, url: str, token: str, topic: str) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        try:
            with httpx.stream("GET", f"{url}/v1/topics/{topic}/events", headers=headers, timeout=120) as r:
                kind = None
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        kind = line.removeprefix("event: ")
                    elif line.startswith("data: ") and kind is not None:
                        with self._arrived:
                            self.events.append((kind, json.loads(line.removeprefix("data: "))))
                            self._arrived.notify_all()
                        kind = None
        finally:
            with self._arrived:
                self.ended.set()
                self._arrived.notify_all()

    def wait_for(self, count: int) -> None:
        """Until ``count`` events arrived or the stream ended (a hang guard, not a time limit)."""
        with self._arrived:
            assert self._arrived.wait_for(lambda: len(self.events) >= count or self.ended.is_set(), timeout=300)

    def join(self) -> None:
        self._thread.join(timeout=300)
        assert not self._thread.is_alive(), "the stream did not end"


def _withdraw(broker: Broker, student: Node, how: str) -> str:
    """Disable the student's node or revoke its token; returns the 401 code its requests now get."""
    admin = broker.admin()
    if how == "disable":
        assert admin.post(f"/v1/nodes/{student.name}/disable").status_code == 200
        return "node_disabled"
    (token,) = [t for t in admin.get(f"/v1/nodes/{student.name}/tokens").json() if t["revoked_at"] is None]
    assert admin.delete(f"/v1/tokens/{token['id']}").status_code == 200
    return "token_revoked"


@pytest.mark.parametrize("how", ["disable", "revoke"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_event_stream_ends_when_its_credentials_are_withdrawn(
    start_broker: Callable[..., Broker], tmp_path: Path, backend: str, how: str
) -> None:
    """Promise: revocation takes effect on the next request; disabling refuses every token at once. An open
    SSE stream delivers nothing published after its token is revoked or its node disabled: it says why and ends."""
    broker = start_broker(backend)
    teacher, student = broker.node("teacher"), broker.node("student", with_key=False)
    topic = unique("sse.revoke")
    first = packet_bytes(tmp_path, teacher.key, topic, seed=1)
    assert upload(teacher, topic, first).status_code == 201
    stream = SseReader(broker.url, student.token, topic)
    stream.wait_for(1)
    assert stream.events[0][1]["packet"]["id"] == packet_id(first)

    code = _withdraw(broker, student, how)
    assert student.http.get("/v1/me").json()["code"] == code
    later = packet_bytes(tmp_path, teacher.key, topic, seed=2)
    assert upload(teacher, topic, later).status_code == 201
    stream.join()  # the publish wakes the stream, which re-checks its token and ends
    kinds = [kind for kind, _ in stream.events]
    assert kinds == ["published", "error"], stream.events
    assert stream.events[1][1]["code"] == code
    assert packet_id(later) not in json.dumps(stream.events)


@pytest.mark.parametrize("how", ["disable", "revoke"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_long_poll_in_flight_returns_401_after_its_credentials_are_withdrawn(
    start_broker: Callable[..., Broker], tmp_path: Path, backend: str, how: str
) -> None:
    broker = start_broker(backend, max_wait_seconds=120)
    teacher, student = broker.node("teacher"), broker.node("student", with_key=False)
    topic = unique("poll.revoke")
    assert upload(teacher, topic, packet_bytes(tmp_path, teacher.key, topic, seed=1)).status_code == 201
    assert student.http.put("/v1/subscriptions/follow", json={"topic": topic}).status_code == 201
    cursor = student.http.get(f"/v1/topics/{topic}/packets").json()["cursor"]
    assert student.http.post("/v1/subscriptions/follow/ack", json={"cursor": cursor}).status_code == 200
    with ThreadPoolExecutor(2) as pool:
        by_topic = pool.submit(student.http.get, f"/v1/topics/{topic}/packets", params={"after": cursor, "wait": 100})
        by_name = pool.submit(student.http.get, "/v1/subscriptions/follow/packets", params={"wait": 100}, timeout=120)
        # Both are waiting (nothing after the cursor); withdraw, then publish what would wake them.
        _wait_until_waiting(broker, topic, 2)
        code = _withdraw(broker, student, how)
        later = packet_bytes(tmp_path, teacher.key, topic, seed=2)
        assert upload(teacher, topic, later).status_code == 201
        for response in (by_topic.result(), by_name.result()):
            assert (response.status_code, response.json()["code"]) == (401, code), response.text
            assert packet_id(later) not in response.text


def _wait_until_waiting(broker: Broker, topic: str, count: int) -> None:
    """Until ``count`` long-polls wait on the topic's wake-up (the hub's one event per topic has waiters)."""
    import time

    hub = broker.state.hub
    for _ in range(3000):
        event = hub._events.get(topic)
        if event is not None and len(getattr(event, "_waiters", ())) >= count:
            return
        time.sleep(0.05)
    raise AssertionError("the long-polls never started waiting")


# ------------------------------------------------------------------ 2. key revocation racing an upload


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_key_revoked_while_its_upload_streams_refuses_the_upload(
    start_broker: Callable[..., Broker], tmp_path: Path, backend: str
) -> None:
    """The key is checked again where the row is committed: an upload whose key was revoked after its header
    was accepted is refused (422 ``key_revoked``), leaves no row, no blob, no staged upload and no event."""
    broker = start_broker(backend)
    teacher = broker.node("teacher")
    topic = unique("race.revoke")
    big = {
        "concepts": np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32),
        "traces": np.random.default_rng(1).standard_normal((64, 128, 512)).astype(np.float16),  # 8 MiB
        "probe_tokens": make_tensors()["probe_tokens"],
    }
    data = packet_bytes(tmp_path, teacher.key, topic, tensors=big)
    header_sent, revoked = threading.Event(), threading.Event()

    def body() -> Iterator[bytes]:
        yield data[: 6 << 20]  # the header and more than an S3 part: the broker checks the key and stages a part
        header_sent.set()
        assert revoked.wait(timeout=300)
        yield data[6 << 20 :]

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(upload, teacher, topic, body())
        assert header_sent.wait(timeout=300)
        _wait_until_staging(broker)
        fingerprint = teacher.key.verify_key.fingerprint
        assert teacher.http.post(f"/v1/keys/{fingerprint}/revoke", json={"reason": "leaked"}).status_code == 200
        revoked.set()
        r = pending.result()
    assert (r.status_code, r.json()["code"]) == (422, "key_revoked"), r.text
    assert packet_id(data) not in rows_of(broker, topic)
    assert broker.admin().get(f"/v1/packets/{packet_id(data)}").status_code == 404
    assert not broker.blob_exists(data) and broker.staged_nothing()


def _wait_until_staging(broker: Broker) -> None:
    """Until the upload's staging is visible (its header was checked: the key was live then)."""
    import time

    for _ in range(3000):
        if not broker.staged_nothing():
            return
        time.sleep(0.05)
    raise AssertionError("the upload never started staging")


def test_the_sdk_does_not_trust_a_cached_key_past_its_revocation(
    start_broker: Callable[..., Broker], tmp_path: Path
) -> None:
    """A student that cached key K (from an earlier fetch) and whose next download of a K-signed packet is
    under way when K is revoked refuses that packet (``key_revoked``) and leaves nothing in its inbox."""
    broker = start_broker("postgres")
    teacher, student = broker.node("teacher"), broker.node("student", with_key=False)
    topic = unique("sdk.revoke")
    first, second = (packet_bytes(tmp_path, teacher.key, topic, seed=s) for s in (1, 2))
    for data in (first, second):
        assert upload(teacher, topic, data).status_code == 201
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    fingerprint = teacher.key.verify_key.fingerprint
    with BrokerClient(broker.url, student.token, quiet=True) as client:
        client.fetch(packet_id(first), inbox)  # K is now in the client's cache
        cached = client.verify_key_for

        def revoke_meanwhile(fp: str, *, fresh: bool = False) -> Any:
            key = cached(fp, fresh=fresh)
            if not fresh:  # the header has arrived and was checked with the cached key; the body is still due
                assert teacher.http.post(f"/v1/keys/{fingerprint}/revoke", json={}).status_code == 200
            return key

        client.verify_key_for = revoke_meanwhile  # type: ignore[method-assign]
        with pytest.raises(VerificationError) as refused:
            client.fetch(packet_id(second), inbox)
    assert refused.value.code == "key_revoked"
    assert sorted(p.name for p in inbox.iterdir()) == [f"{packet_id(first)}.m2kt"]


# ------------------------------------------------------------------ 3 and 4. concurrent writes


def _at_once(count: int, call: Callable[[], httpx.Response]) -> list[httpx.Response]:
    barrier = threading.Barrier(count)

    def go() -> httpx.Response:
        barrier.wait(timeout=300)
        return call()

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: go(), range(count)))


@pytest.mark.parametrize("backend", [*BACKENDS, "embedded-process"])
def test_concurrent_rotations_with_one_token_leave_one_live_token(
    start_broker: Callable[..., Broker], backend: str
) -> None:
    """Twelve simultaneous rotations with one token, five times over: each time one new token, eleven 401s."""
    broker = start_broker(backend)
    for _ in range(5):
        node = broker.node("student", with_key=False)
        answers = _at_once(
            12,
            lambda node=node: httpx.post(
                f"{broker.url}/v1/me/token", json={}, headers={"Authorization": f"Bearer {node.token}"}, timeout=120
            ),
        )
        codes = sorted((r.status_code, r.json().get("code", "")) for r in answers)
        live = [t for t in broker.admin().get(f"/v1/nodes/{node.name}/tokens").json() if t["revoked_at"] is None]
        assert (codes, len(live)) == ([(201, "")] + [(401, "token_revoked")] * 11, 1), (codes, live)
        (winner,) = [r.json() for r in answers if r.status_code == 201]
        assert [t["id"] for t in live] == [winner["id"]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_create_or_get_answers_as_if_in_turn(start_broker: Callable[..., Broker], backend: str) -> None:
    """Twenty simultaneous identical create-or-get requests: one 201, the rest 200 with the same record (no 500)."""
    broker = start_broker(backend)
    student = broker.node("student", with_key=False)
    admin = broker.admin()
    topic = unique("race.sub")
    registration = calls.register_key(prove_key(SigningKey.generate(), student.name)).json
    direction = [[1.0] + [0.0] * 7]
    flagged = unique("race-flag")
    for call in (
        lambda: student.http.put("/v1/subscriptions/one", json={"topic": topic}),
        lambda: student.http.post("/v1/keys", json=registration),
        lambda: admin.put(
            f"/v1/admin/flagged-concepts/{flagged}", json={"d_model": 8, "labels": ["x"], "directions": direction}
        ),
    ):
        answers = _at_once(20, call)
        statuses = sorted(r.status_code for r in answers)
        assert statuses == [200] * 19 + [201], [(r.status_code, r.text[:200]) for r in answers]
        assert all(r.headers["content-type"] == "application/json" for r in answers)


# ------------------------------------------------------------------ 7. text a database cannot store


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nul_in_the_manifest_is_refused_alike_and_leaves_nothing(
    start_broker: Callable[..., Broker], tmp_path: Path, backend: str
) -> None:
    from m2kt.format.manifest import ConceptEntry

    broker = start_broker(backend)
    teacher = broker.node("teacher")
    topic = unique("nul")
    concepts = [ConceptEntry(id=f"op:{i}", label=f"concept\x00{i}", kind="named", safety_score=0.0) for i in range(4)]
    data = packet_bytes(tmp_path, teacher.key, topic, concepts=concepts)
    r = upload(teacher, topic, data)
    assert (r.status_code, r.json()["code"]) == (422, "nul_in_manifest"), r.text
    assert "remove it and sign again" in r.json()["message"]
    assert packet_id(data) not in rows_of(broker, topic)
    assert not broker.blob_exists(data) and broker.staged_nothing()
    audit = broker.admin().get("/v1/admin/audit", params={"limit": 20}).json()
    refused = [e for e in audit if e["action"] == "packet.refused" and e["target"] == topic]
    assert refused and refused[0]["detail"]["code"] == "nul_in_manifest"


# ------------------------------------------------------------------ 8. the storage quota


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_quota_counts_every_new_packet_even_with_shared_data(
    start_broker: Callable[..., Broker], tmp_path: Path, backend: str
) -> None:
    """Only re-uploading the very same file is free. Packets sharing one data section (different
    ``created_at``) each count in full, so a node cannot store several times its quota."""
    from datetime import UTC, datetime, timedelta

    probe = start_broker(backend)
    size = len(packet_bytes(tmp_path, probe.node("teacher").key, "t"))
    broker = start_broker(backend, node_quota_bytes=int(size * 2.5))
    teacher = broker.node("teacher")
    topic = unique("quota")
    tensors = make_tensors(seed=7)
    same_data = [
        packet_bytes(
            tmp_path,
            teacher.key,
            topic,
            tensors=tensors,
            created_at=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i),
        )
        for i in range(3)
    ]
    assert len({hashlib.sha256(d[-256:]).hexdigest() for d in same_data}) == 1  # one data section
    assert [upload(teacher, topic, d).status_code for d in same_data[:2]] == [201, 201]
    r = upload(teacher, topic, same_data[2])
    assert (r.status_code, r.json()["code"]) == (413, "quota_exceeded"), r.text
    assert upload(teacher, topic, same_data[0]).status_code == 200  # the same file again: free, stores nothing
    used = sum(
        p["size"] for p in broker.admin().get(f"/v1/topics/{topic}/packets").json()["items"] for p in [p["packet"]]
    )
    assert used <= size * 2.5


# ------------------------------------------------------------------ 9. what /readyz tells strangers


@pytest.mark.parametrize("backend", BACKENDS)
def test_readyz_says_whether_never_where(
    start_broker: Callable[..., Broker], backend: str, broker_bucket: str, tmp_path: Path
) -> None:
    broker = start_broker(backend)
    ready = httpx.get(f"{broker.url}/readyz")
    assert ready.json() == {"status": "ready"}
    where = broker.state.storage.description
    assert broker.admin().get("/v1/admin/stats").json()["storage"] == where  # admins still see it

    # Storage gone: the 503 names the part, not its location.
    if backend == "postgres":
        broker.state.storage.bucket = "m2kt-no-such-bucket-" + uuid.uuid4().hex[:8]
        secret_places = [broker.state.storage.bucket, broker_bucket, "127.0.0.1"]
    else:
        blobs = Path(broker.state.settings.effective_storage_url)
        blobs.rename(blobs.with_name("moved"))
        blobs.write_text("not a directory")
        secret_places = [str(tmp_path), str(blobs)]
    down = httpx.get(f"{broker.url}/readyz")
    assert (down.status_code, down.json()["code"]) == (503, "storage_unavailable"), down.text
    assert not any(place in down.text for place in secret_places), down.text
