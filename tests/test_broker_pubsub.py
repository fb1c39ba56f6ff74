"""Pub/sub on real sockets: long-poll, Server-Sent Events, named subscriptions with kept
cursors, concurrency, and wake-ups that cross broker processes through Postgres."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from m2kt.benchmarks.harness.brokers import BrokerProcess, Node, register_node, s3_env, unique
from m2kt.benchmarks.harness.packets import packet_bytes
from tests.conftest import LiveBroker


@pytest.fixture(scope="module")
def teacher(live_broker: LiveBroker) -> Node:
    return register_node(live_broker.url, live_broker.admin_token, "teacher")


@pytest.fixture(scope="module")
def student(live_broker: LiveBroker) -> Node:
    return register_node(live_broker.url, live_broker.admin_token, "student", with_key=False)


def publish(node: Node, topic: str, data: bytes, base_url: str | None = None) -> dict:
    url = f"{base_url or ''}/v1/topics/{topic}/packets"
    r = (
        httpx.post(url, content=data, headers={"Authorization": f"Bearer {node.token}"}, timeout=60)
        if base_url
        else node.http.post(url, content=data)
    )
    assert r.status_code == 201, r.text
    return r.json()


def read_sse(
    url: str,
    token: str,
    want: int,
    timeout: float,
    received: list,
    after: int | None = None,
    ready: threading.Event | None = None,
) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    if after is not None:
        headers["Last-Event-ID"] = str(after)
    with httpx.stream("GET", url, headers=headers, timeout=timeout) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        event: dict[str, str] = {}
        for line in r.iter_lines():
            if ready is not None and line.startswith(": connected"):
                ready.set()
            if line.startswith(("id:", "event:", "data:")):
                field, _, value = line.partition(":")
                event[field] = value.strip()
            elif line == "" and event:
                received.append((int(event["id"]), event["event"], json.loads(event["data"]), time.monotonic()))
                event = {}
                if len(received) >= want:
                    return


def test_long_poll_wakes_when_a_packet_arrives(
    live_broker: LiveBroker, teacher: Node, student: Node, tmp_path: Path
) -> None:
    topic = unique("lp")
    first = publish(teacher, topic, packet_bytes(tmp_path, teacher.key, topic, seed=0))
    data = packet_bytes(tmp_path, teacher.key, topic, seed=1)
    published_at: list[float] = []

    def later() -> None:
        time.sleep(0.5)
        published_at.append(time.monotonic())
        publish(teacher, topic, data)

    threading.Thread(target=later).start()
    started = time.monotonic()
    page = student.http.get(f"/v1/topics/{topic}/packets", params={"after": 1, "wait": 10}).json()
    woke = time.monotonic()
    assert [e["packet"]["id"] for e in page["items"]] == [hashlib.sha256(data).hexdigest()]
    assert page["cursor"] == 2 and woke - published_at[0] < 1.0 and woke - started < 5
    # Nothing new: the wait runs out and returns the same cursor.
    empty = student.http.get(f"/v1/topics/{topic}/packets", params={"after": 2, "wait": 0.3}).json()
    assert empty == {"items": [], "cursor": 2}
    assert first["id"] != page["items"][0]["packet"]["id"]


def test_sse_streams_events_and_resumes_from_last_event_id(
    live_broker: LiveBroker, teacher: Node, student: Node, tmp_path: Path
) -> None:
    topic = unique("sse")
    ids = [publish(teacher, topic, packet_bytes(tmp_path, teacher.key, topic, seed=s))["id"] for s in range(2)]
    received: list = []
    ready = threading.Event()
    reader = threading.Thread(
        target=read_sse,
        args=(f"{live_broker.url}/v1/topics/{topic}/events", student.token, 3, 20, received),
        kwargs={"ready": ready},
    )
    reader.start()
    assert ready.wait(10)
    ids.append(publish(teacher, topic, packet_bytes(tmp_path, teacher.key, topic, seed=2))["id"])
    reader.join(20)
    assert [(seq, kind, data["packet"]["id"]) for seq, kind, data, _ in received] == [
        (1, "published", ids[0]),
        (2, "published", ids[1]),
        (3, "published", ids[2]),
    ]
    resumed: list = []
    read_sse(f"{live_broker.url}/v1/topics/{topic}/events", student.token, 1, 20, resumed, after=2)
    assert [r[0] for r in resumed] == [3]


def test_named_subscription_keeps_its_cursor(
    live_broker: LiveBroker, teacher: Node, student: Node, tmp_path: Path
) -> None:
    topic = unique("sub")
    for s in range(3):
        publish(teacher, topic, packet_bytes(tmp_path, teacher.key, topic, seed=s))
    r = student.http.put("/v1/subscriptions/worker", json={"topic": topic})
    assert r.status_code == 201 and r.json()["cursor"] == 0
    assert student.http.put("/v1/subscriptions/worker", json={"topic": topic}).status_code == 200
    clash = student.http.put("/v1/subscriptions/worker", json={"topic": unique("other")})
    assert (clash.status_code, clash.json()["code"]) == (409, "subscription_topic_mismatch")

    page = student.http.get("/v1/subscriptions/worker/packets", params={"limit": 2}).json()
    assert [e["seq"] for e in page["items"]] == [1, 2]
    moved = student.http.post("/v1/subscriptions/worker/ack", json={"cursor": 2}).json()
    assert moved["cursor"] == 2 and moved["topic"] == topic and moved["updated_at"].endswith("Z")
    back = student.http.post("/v1/subscriptions/worker/ack", json={"cursor": 1}).json()
    assert back["cursor"] == 2 and back["updated_at"] == moved["updated_at"]  # never back, and nothing changed
    ahead = student.http.post("/v1/subscriptions/worker/ack", json={"cursor": 99})
    assert (ahead.status_code, ahead.json()["code"]) == (409, "cursor_ahead")
    assert [e["seq"] for e in student.http.get("/v1/subscriptions/worker/packets").json()["items"]] == [3]
    # Another node's subscription of the same name is its own.
    other = register_node(live_broker.url, live_broker.admin_token, "student", with_key=False)
    assert other.http.get("/v1/subscriptions/worker").json()["code"] == "subscription_not_found"
    missing = other.http.post("/v1/subscriptions/worker/ack", json={"cursor": 1})
    assert (missing.status_code, missing.json()["code"]) == (404, "subscription_not_found")


def test_20_publishers_x_10_packets_listed_once_and_seen_by_every_subscriber(
    live_broker: LiveBroker, student: Node, tmp_path: Path
) -> None:
    topic = unique("load")
    publishers = [register_node(live_broker.url, live_broker.admin_token, "teacher") for _ in range(20)]
    packets = {p.name: [packet_bytes(tmp_path, p.key, topic, seed=i) for i in range(10)] for p in publishers}
    expected = {hashlib.sha256(d).hexdigest() for ds in packets.values() for d in ds}
    subscribers = [register_node(live_broker.url, live_broker.admin_token, "student", with_key=False) for _ in range(3)]
    seen: dict[str, list[int]] = {s.name: [] for s in subscribers}
    seen_ids: dict[str, list[str]] = {s.name: [] for s in subscribers}
    done = threading.Event()

    def consume(sub: Node) -> None:
        sub.http.put("/v1/subscriptions/all", json={"topic": topic})
        deadline = time.monotonic() + 120
        while len(seen[sub.name]) < 200 and time.monotonic() < deadline:
            page = sub.http.get("/v1/subscriptions/all/packets", params={"wait": 2, "limit": 50}).json()
            for e in page["items"]:
                seen[sub.name].append(e["seq"])
                seen_ids[sub.name].append(e["packet"]["id"])
            if page["items"]:
                sub.http.post("/v1/subscriptions/all/ack", json={"cursor": page["cursor"]})

    consumers = [threading.Thread(target=consume, args=(s,)) for s in subscribers]
    for c in consumers:
        c.start()

    def run(p: Node) -> list[int]:
        with httpx.Client(base_url=live_broker.url, headers={"Authorization": f"Bearer {p.token}"}, timeout=120) as h:
            return [h.post(f"/v1/topics/{topic}/packets", content=d).status_code for d in packets[p.name]]

    with ThreadPoolExecutor(20) as pool:
        statuses = [s for result in pool.map(run, publishers) for s in result]
    done.set()
    for c in consumers:
        c.join(150)
    assert statuses == [201] * 200
    log: list[dict] = []
    after = 0
    while True:
        page = student.http.get(f"/v1/topics/{topic}/packets", params={"after": after, "limit": 1000}).json()
        if not page["items"]:
            break
        log += page["items"]
        after = page["cursor"]
    assert [e["seq"] for e in log] == list(range(1, 201))
    assert sorted(e["packet"]["id"] for e in log) == sorted(expected)  # every packet exactly once
    for sub in subscribers:
        assert seen[sub.name] == list(range(1, 201)), f"{sub.name} saw {len(seen[sub.name])}"
        assert set(seen_ids[sub.name]) == expected


def test_publish_on_one_broker_wakes_long_poll_and_sse_on_another(
    live_broker: LiveBroker,
    broker_database: str,
    broker_bucket: str,
    s3_server,
    teacher: Node,
    student: Node,
    tmp_path: Path,
) -> None:
    env = {
        "M2KT_DATABASE_URL": broker_database,
        "M2KT_STORAGE_URL": f"s3://{broker_bucket}",
        "M2KT_DATA_DIR": str(tmp_path),
        "M2KT_POLL_FALLBACK_SECONDS": "30",
        **s3_env(s3_server),
    }
    a = BrokerProcess(env, log_path=tmp_path / "a.log").start()
    b = BrokerProcess(env, log_path=tmp_path / "b.log").start()
    try:
        topic = unique("replicas")
        publish(teacher, topic, packet_bytes(tmp_path, teacher.key, topic, seed=0), base_url=a.url)
        results: dict[str, float] = {}
        sse: list = []
        ready = threading.Event()
        sse_reader = threading.Thread(
            target=read_sse,
            args=(f"{b.url}/v1/topics/{topic}/events", student.token, 2, 20, sse),
            kwargs={"ready": ready},
        )
        sse_reader.start()

        def long_poll() -> None:
            r = httpx.get(
                f"{b.url}/v1/topics/{topic}/packets",
                params={"after": 1, "wait": 20},
                headers={"Authorization": f"Bearer {student.token}"},
                timeout=30,
            )
            assert r.json()["items"], r.text
            results["long_poll"] = time.monotonic()

        poller = threading.Thread(target=long_poll)
        poller.start()
        assert ready.wait(10)
        time.sleep(0.5)  # both waiting on B
        sent = time.monotonic()
        publish(teacher, topic, packet_bytes(tmp_path, teacher.key, topic, seed=1), base_url=a.url)
        acknowledged = time.monotonic()
        poller.join(20)
        sse_reader.join(20)
        long_poll_latency = results["long_poll"] - acknowledged
        sse_latency = sse[-1][3] - acknowledged
        print(
            f"publish took {acknowledged - sent:.3f}s; wake-up on the other broker: long-poll "
            f"{long_poll_latency:.3f}s, SSE {sse_latency:.3f}s after the publish returned"
        )
        # The wake-up must come from NOTIFY, not from the 30 s polling fallback: far below 30 s however busy
        # the machine is (no tighter wall-clock bound; the latencies are printed).
        assert long_poll_latency < 15.0 and sse_latency < 15.0
    finally:
        a.stop()
        b.stop()


def test_a_cursor_past_every_32_bit_seq_reads_an_empty_page(
    live_broker: LiveBroker, teacher: Node, student: Node, tmp_path: Path
) -> None:
    """seq is 64-bit: a cursor above 2**31 is an empty page on every read path, not an out-of-range error."""
    topic = unique("far")
    publish(teacher, topic, packet_bytes(tmp_path, teacher.key, topic, seed=1))
    far = 2**62
    for params in ({"after": far}, {"after": far, "wait": 0.01}):
        r = student.http.get(f"/v1/topics/{topic}/packets", params=params)
        assert r.status_code == 200 and r.json() == {"items": [], "cursor": far}, r.text
