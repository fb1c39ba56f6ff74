"""The SDK against a live broker (uvicorn on a socket, Postgres, S3): publish, fetch and
subscribe, verified end to end — the same suite for the sync and the async client."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from m2kt import PermissionDenied, VerificationError, verify_packet
from m2kt.benchmarks.harness.brokers import register_node, unique
from m2kt.benchmarks.harness.packets import make_body, make_tensors
from m2kt.format import write_packet
from tests.client_facade import make_client
from tests.conftest import LiveBroker


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def nodes(live_broker: LiveBroker, kind: str):  # type: ignore[no-untyped-def]
    teacher = register_node(live_broker.url, live_broker.admin_token, "teacher")
    made = []

    def client(token: str, **kwargs):  # type: ignore[no-untyped-def]
        kwargs.setdefault("base_url", live_broker.url)
        c = make_client(kind, token=token, quiet=True, **kwargs)
        made.append(c)
        return c

    yield teacher, client
    for c in made:
        c.close()


def write(tmp: Path, teacher, topic: str, seed: int) -> Path:  # type: ignore[no-untyped-def]
    return write_packet(tmp / f"p{seed}.m2kt", make_body(topic=topic), make_tensors(seed=seed), teacher.key).path


def student_token(live_broker: LiveBroker) -> str:
    return register_node(live_broker.url, live_broker.admin_token, "student", with_key=False).token


def test_publish_then_fetch_verified(live_broker: LiveBroker, nodes, tmp_path: Path) -> None:
    teacher, client = nodes
    topic = unique("sdk")
    path = write(tmp_path, teacher, topic, 0)
    publisher = client(teacher.token)
    record = publisher.publish(path, topic)
    assert record.id == hashlib.sha256(path.read_bytes()).hexdigest() and record.status == "accepted"
    assert publisher.publish(path, topic) == record  # a retry is the same record

    token = student_token(live_broker)
    for redirect in (True, False):
        student = client(token, prefer_redirect=redirect, fsync=not redirect)
        inbox = tmp_path / f"inbox-{redirect}"
        fetched = student.fetch(record.id, f"{inbox}/")
        assert fetched.path == inbox / f"{record.id}.m2kt"
        assert fetched.path.read_bytes() == path.read_bytes()
        assert verify_packet(fetched.path, teacher.key.verify_key).manifest.topic == topic
        assert sorted(p.name for p in inbox.iterdir()) == [f"{record.id}.m2kt"]  # no temporary files


def test_two_subscribers_each_receive_every_packet_once_in_order(
    live_broker: LiveBroker, nodes, tmp_path: Path
) -> None:
    teacher, client = nodes
    topic = unique("fanout")
    publisher = client(teacher.token)
    ids = [publisher.publish(write(tmp_path, teacher, topic, s), topic).id for s in range(5)]
    for name in ("alpha", "beta"):
        subscriber = client(student_token(live_broker))
        got = [(d.seq, d.kind, d.packet_id) for d in subscriber.subscribe(topic, name, dest=tmp_path / name, once=True)]
        assert got == [(i + 1, "published", pid) for i, pid in enumerate(ids)]
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == sorted(f"{i}.m2kt" for i in ids)
        assert list(subscriber.subscribe(topic, name, dest=tmp_path / name, once=True)) == []  # all acknowledged


def test_subscriber_killed_mid_stream_resumes_without_loss(live_broker: LiveBroker, nodes, tmp_path: Path) -> None:
    teacher, client = nodes
    topic = unique("resume")
    publisher = client(teacher.token)
    ids = [publisher.publish(write(tmp_path, teacher, topic, s), topic).id for s in range(5)]
    token = student_token(live_broker)
    handled: list[str] = []
    first = client(token)
    for delivery in first.subscribe(topic, "worker", dest=tmp_path / "in", once=True):
        handled.append(delivery.packet_id)
        if len(handled) == 2:
            break  # dies while handling the 2nd: it was never acknowledged
    again = client(token)
    resumed = [d.packet_id for d in again.subscribe(topic, "worker", dest=tmp_path / "in", once=True)]
    assert resumed == ids[1:]  # the unacknowledged one again, then the rest: nothing lost
    assert set(handled) | set(resumed) == set(ids)


def test_revocation_is_surfaced_to_subscribers(live_broker: LiveBroker, nodes, tmp_path: Path) -> None:
    teacher, client = nodes
    topic = unique("revsub")
    publisher = client(teacher.token)
    pid = publisher.publish(write(tmp_path, teacher, topic, 0), topic).id
    subscriber = client(student_token(live_broker))
    assert [d.kind for d in subscriber.subscribe(topic, "s", dest=tmp_path / "s", once=True)] == ["published"]
    publisher.revoke_key(teacher.key.fingerprint, "compromised")
    later = list(subscriber.subscribe(topic, "s", dest=tmp_path / "s", once=True))
    assert [(d.kind, d.packet_id, d.path, d.record.status) for d in later] == [("revoked", pid, None, "revoked")]
    with pytest.raises(PermissionDenied) as denied:  # the broker no longer serves it to students
        subscriber.fetch(pid, tmp_path / "again/")
    assert denied.value.code == "packet_revoked"
    with pytest.raises(VerificationError) as err:  # and an admin's client refuses the revoked key itself
        client(live_broker.admin_token).fetch(pid, tmp_path / "admin/")
    assert err.value.code == "key_revoked"


def test_pinned_fingerprints_refuse_other_keys(live_broker: LiveBroker, nodes, tmp_path: Path) -> None:
    teacher, client = nodes
    topic = unique("pin")
    pid = client(teacher.token).publish(write(tmp_path, teacher, topic, 0), topic).id
    token = student_token(live_broker)
    assert client(token, trusted_fingerprints={teacher.key.fingerprint}).fetch(pid, tmp_path / "ok/").path.exists()
    with pytest.raises(VerificationError) as err:
        client(token, trusted_fingerprints={"0" * 64}).fetch(pid, tmp_path / "no/")
    assert err.value.code == "untrusted_key"
    assert not (tmp_path / "no").exists() or list((tmp_path / "no").iterdir()) == []


class _FlipBlob:
    """Man in the middle: flips one byte of every packet body (broker stream or presigned S3)."""

    def _flip(self, request: httpx.Request, response: httpx.Response, body: bytes) -> httpx.Response:
        if response.status_code in (200, 206) and (
            request.url.path.endswith("/blob") or "X-Amz-Signature" in str(request.url)
        ):
            data = bytearray(body)
            data[-1] ^= 0x01  # a tensor byte
            body = bytes(data)
        headers = [(k, v) for k, v in response.headers.items() if k.lower() != "content-length"]
        return httpx.Response(response.status_code, headers=headers, content=body, request=request)


class FlipTransport(_FlipBlob, httpx.HTTPTransport):
    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        return self._flip(request, response, response.read())


class AsyncFlipTransport(_FlipBlob, httpx.AsyncHTTPTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        return self._flip(request, response, await response.aread())


@pytest.mark.parametrize("redirect", [True, False], ids=["presigned", "through-broker"])
def test_man_in_the_middle_is_caught_and_leaves_no_file(
    live_broker: LiveBroker, nodes, kind: str, tmp_path: Path, redirect: bool
) -> None:
    teacher, client = nodes
    topic = unique("mitm")
    pid = client(teacher.token).publish(write(tmp_path, teacher, topic, 0), topic).id
    transport = FlipTransport() if kind == "sync" else AsyncFlipTransport()
    victim = client(student_token(live_broker), transport=transport, prefer_redirect=redirect)
    inbox = tmp_path / "inbox"
    with pytest.raises(VerificationError) as err:
        victim.fetch(pid, f"{inbox}/")
    assert err.value.code == "digest_mismatch"
    with pytest.raises(VerificationError):
        for _ in victim.subscribe(topic, "victim", dest=inbox, once=True):
            pass
    assert list(inbox.iterdir()) == []  # nothing at the destination, no temporary file either


def test_subscription_survives_a_broker_restart(
    live_broker: LiveBroker, broker_database: str, broker_bucket: str, s3_server, nodes, tmp_path: Path
) -> None:
    import threading
    import time

    from m2kt.benchmarks.harness.brokers import BrokerProcess, s3_env

    teacher, client = nodes
    env = {
        "M2KT_DATABASE_URL": broker_database,
        "M2KT_STORAGE_URL": f"s3://{broker_bucket}",
        "M2KT_DATA_DIR": str(tmp_path),
        **s3_env(s3_server),
    }
    broker = BrokerProcess(env, log_path=tmp_path / "b1.log").start()
    topic = unique("restart")
    publisher = client(teacher.token)
    ids = [publisher.publish(write(tmp_path, teacher, topic, s), topic).id for s in range(2)]
    subscriber = make_client_for(client, student_token(live_broker), broker.url)
    got: list[str] = []

    def consume() -> None:
        for delivery in subscriber.subscribe(topic, "survivor", dest=tmp_path / "in", wait=1):
            got.append(delivery.packet_id)
            if len(got) == 4:
                return

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    deadline = time.monotonic() + 30
    while len(got) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    broker.stop()  # the subscriber is mid long-poll: it now sees connection errors and backs off
    ids += [publisher.publish(write(tmp_path, teacher, topic, s), topic).id for s in range(2, 4)]
    restarted = BrokerProcess(env, port=broker.port, log_path=tmp_path / "b2.log").start()
    try:
        reader.join(60)
        assert got == ids
    finally:
        restarted.stop()


def make_client_for(factory, token: str, url: str):  # type: ignore[no-untyped-def]
    from m2kt import RetryPolicy

    return factory(token, base_url=url, retry=RetryPolicy(attempts=3, backoff=0.2, max_backoff=1.0))
