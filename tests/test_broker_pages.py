"""Event pages are written from the database's JSON text (no manifest is decoded): the bytes must be the
same document the response models give — on Postgres (JSONB) and on the embedded SQLite alike, for
accepted, quarantined and revoked packets, with and without parents, and through every route that sends
pages (topic page, long-poll, subscription page, SSE)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from m2kt.benchmarks.harness.brokers import unique
from m2kt.benchmarks.harness.packets import packet_bytes
from m2kt.broker.services.pages import raw_event_page
from m2kt.broker.services.subscriptions import event_page
from tests.two_backends import BACKENDS, Broker, start_broker, upload  # noqa: F401 - start_broker is a fixture


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_a_raw_page_is_the_response_models_document(
    start_broker: Callable[..., Broker], backend: str, tmp_path: Path
) -> None:
    broker = start_broker(backend)
    teacher = broker.node("teacher")
    topic = unique("pages")
    ids = []
    for seed in range(6):
        parents = [ids[-1], "f" * 64] if ids and seed % 2 else []  # a known parent and one from elsewhere
        data = packet_bytes(tmp_path, teacher.key, topic, seed=seed, parents=parents)
        r = upload(teacher, topic, data)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    admin = broker.admin()
    assert admin.post(f"/v1/packets/{ids[2]}/quarantine").status_code == 200
    assert admin.post(f"/v1/keys/{teacher.key.fingerprint}/revoke", json={"reason": "test"}).status_code == 200
    for after, limit in ((0, 100), (0, 3), (4, 100), (100, 100)):
        raw = json.loads(raw_event_page(broker.state.sessions, topic, after, limit).json())
        models = event_page(broker.state.sessions, topic, after, limit).model_dump(mode="json")
        assert raw == models, (after, limit)
    assert len(json.loads(raw_event_page(broker.state.sessions, topic, 0, 100).json())["items"]) > len(ids)

    student = broker.node("student", with_key=False)
    served = student.http.get(f"/v1/topics/{topic}/packets", params={"after": 0, "limit": 100})
    assert served.status_code == 200 and served.headers["content-type"] == "application/json"
    assert served.json() == event_page(broker.state.sessions, topic, 0, 100).model_dump(mode="json")
    polled = student.http.get(f"/v1/topics/{topic}/packets", params={"after": 2, "wait": 5})
    assert polled.json() == event_page(broker.state.sessions, topic, 2, 100).model_dump(mode="json")
    assert student.http.put(f"/v1/subscriptions/s-{topic}", json={"topic": topic}).status_code in (200, 201)
    sub = student.http.get(f"/v1/subscriptions/s-{topic}/packets", params={"limit": 4})
    assert sub.json() == event_page(broker.state.sessions, topic, 0, 4).model_dump(mode="json")
