"""Limits and quotas on a live broker: upload rate (429 + Retry-After), storage quota, tensor count and
manifest size (413), topic names (400), token expiry by default and self-service rotation."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest

from m2kt.benchmarks.harness.brokers import Node, register_node, unique
from m2kt.benchmarks.harness.packets import make_body, make_tensors, packet_bytes
from m2kt.broker.ratelimit import UploadRateLimiter
from tests.conftest import LiveBroker, start_live_broker


def post(url: str, node: Node, topic: str, data: bytes) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/topics/{topic}/packets", content=data, headers={"Authorization": f"Bearer {node.token}"}, timeout=60
    )


@pytest.fixture
def limited(live_broker: LiveBroker, s3_server, tmp_path: Path, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """A second broker on the same database and bucket, with the settings the test passes via indirect param."""
    _, _, server = start_live_broker(
        live_broker.state.settings.database_url,  # type: ignore[attr-defined]
        s3_server,
        live_broker.bucket,
        tmp_path,
        token=live_broker.admin_token,
        **request.param,
    )
    with server as url:
        yield url


def test_token_bucket_refills_at_the_configured_rate() -> None:
    now = [0.0]
    limiter = UploadRateLimiter(per_minute=60, burst=2, clock=lambda: now[0])
    assert [limiter.take(1), limiter.take(1)] == [0.0, 0.0]
    assert limiter.take(1) == pytest.approx(1.0)  # one token a second
    assert limiter.take(2) == 0.0  # nodes have their own buckets
    now[0] = 0.5
    assert limiter.take(1) == pytest.approx(0.5)
    now[0] = 1.0
    assert limiter.take(1) == 0.0
    assert UploadRateLimiter.retry_after(0.01) == "1" and UploadRateLimiter.retry_after(2.2) == "3"
    assert UploadRateLimiter(per_minute=0, burst=1).take(1) == 0.0  # 0: unlimited


@pytest.mark.parametrize("limited", [{"upload_rate_per_minute": 6, "upload_burst": 2}], indirect=True)
def test_upload_rate_is_429_with_retry_after(limited: str, live_broker: LiveBroker, tmp_path: Path) -> None:
    teacher = register_node(live_broker.url, live_broker.admin_token, "teacher")
    other = register_node(live_broker.url, live_broker.admin_token, "teacher")
    topic = unique("rate")
    assert teacher.key and other.key
    statuses = [post(limited, teacher, topic, packet_bytes(tmp_path, teacher.key, topic, seed=i)) for i in range(3)]
    assert [r.status_code for r in statuses[:2]] == [201, 201]
    refused = statuses[2]
    assert (refused.status_code, refused.json()["code"]) == (429, "rate_limited"), refused.text
    assert int(refused.headers["Retry-After"]) >= 9  # 6/min: a token every 10 s
    assert "retry in" in refused.json()["message"]
    # garbage counts too, and another node is not affected
    assert post(limited, teacher, topic, b"junk").status_code == 429
    assert post(limited, other, topic, packet_bytes(tmp_path, other.key, topic, seed=9)).status_code == 201


@pytest.mark.parametrize("limited", [{"node_quota_bytes": 6000, "upload_rate_per_minute": 0}], indirect=True)
def test_storage_quota_is_413_and_reuploads_are_free(limited: str, live_broker: LiveBroker, tmp_path: Path) -> None:
    teacher = register_node(live_broker.url, live_broker.admin_token, "teacher")
    assert teacher.key
    topic = unique("quota")
    pad = {"pad": np.zeros(3000, np.uint8)}
    first = packet_bytes(tmp_path, teacher.key, topic, tensors={**make_tensors(), **pad})
    second = packet_bytes(tmp_path, teacher.key, topic, tensors={**make_tensors(seed=1), **pad})
    assert post(limited, teacher, topic, first).status_code == 201
    assert post(limited, teacher, topic, first).status_code == 200  # the same packet again: no new bytes
    r = post(limited, teacher, topic, second)
    assert (r.status_code, r.json()["code"]) == (413, "quota_exceeded"), r.text
    assert "quota of 6000 bytes" in r.json()["message"]


@pytest.mark.parametrize(
    "limited", [{"max_tensor_count": 4, "max_manifest_bytes": 4000, "upload_rate_per_minute": 0}], indirect=True
)
def test_tensor_count_and_manifest_size_are_413(limited: str, live_broker: LiveBroker, tmp_path: Path) -> None:
    teacher = register_node(live_broker.url, live_broker.admin_token, "teacher")
    assert teacher.key
    topic = unique("limits")
    extra = {f"t{i}": np.zeros(2, np.float32) for i in range(3)}
    r = post(limited, teacher, topic, packet_bytes(tmp_path, teacher.key, topic, tensors={**make_tensors(), **extra}))
    assert (r.status_code, r.json()["code"]) == (413, "too_many_tensors"), r.text
    many = packet_bytes(tmp_path, teacher.key, topic, tensors=make_tensors(k=60), concepts=make_body(k=60).concepts)
    r = post(limited, teacher, topic, many)
    assert (r.status_code, r.json()["code"]) == (413, "manifest_too_large"), r.text
    assert post(limited, teacher, topic, packet_bytes(tmp_path, teacher.key, topic)).status_code == 201


@pytest.mark.parametrize("bad", ["UPPER", "-lead", "trail.", "a" * 129, "sp ace", "semi;colon"])
def test_topic_name_rules(live_broker: LiveBroker, bad: str) -> None:
    teacher = register_node(live_broker.url, live_broker.admin_token, "teacher", with_key=False)
    r = teacher.http.post(f"/v1/topics/{bad}/packets", content=b"x")
    assert (r.status_code, r.json()["code"]) == (400, "invalid_topic"), r.text
    assert "lowercase letters" in r.json()["message"]


def test_tokens_expire_by_default_and_rotate(live_broker: LiveBroker) -> None:
    node = register_node(live_broker.url, live_broker.admin_token, "student", with_key=False)
    me = node.http.get("/v1/me").json()
    ttl = live_broker.state.settings.token_ttl_days  # type: ignore[attr-defined]
    expires = datetime.fromisoformat(me["token_expires_at"])
    assert abs(expires - (datetime.now(UTC) + timedelta(days=ttl))) < timedelta(minutes=5)

    rotated = node.http.post("/v1/me/token", json={"ttl_days": 7})
    assert rotated.status_code == 201, rotated.text
    new = rotated.json()
    assert new["token"].startswith("m2kt_") and new["token"] != node.token and new["scopes"] == me["scopes"]
    old = node.http.get("/v1/me")
    assert (old.status_code, old.json()["code"]) == (401, "token_revoked")
    fresh = httpx.Client(base_url=live_broker.url, headers={"Authorization": f"Bearer {new['token']}"})
    body = fresh.get("/v1/me").json()
    assert body["node"] == node.name
    assert datetime.fromisoformat(body["token_expires_at"]) < datetime.now(UTC) + timedelta(days=8)
    again = node.http.post("/v1/me/token", json={})
    assert (again.status_code, again.json()["code"]) == (401, "token_revoked")  # a revoked token cannot rotate
    actions = [e["action"] for e in live_broker.admin().get("/v1/admin/audit", params={"limit": 50}).json()]
    assert "token.rotated" in actions


@pytest.mark.parametrize("limited", [{"upload_rate_per_minute": 120, "upload_burst": 1}], indirect=True)
def test_sdk_publish_waits_out_a_429(limited: str, live_broker: LiveBroker, tmp_path: Path) -> None:
    from m2kt.sdk.client import BrokerClient

    teacher = register_node(live_broker.url, live_broker.admin_token, "teacher")
    assert teacher.key
    topic = unique("sdkrate")
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    with BrokerClient(limited, teacher.token, sleep=sleep, quiet=True) as broker:
        for seed in range(2):
            path = tmp_path / f"{seed}.m2kt"
            path.write_bytes(packet_bytes(tmp_path, teacher.key, topic, seed=seed))
            assert broker.publish(path, topic).topic == topic
    assert waits == [1.0]  # the second upload was refused once and retried after Retry-After: 1


def test_rotation_cannot_stretch_a_tokens_lifetime(live_broker: LiveBroker) -> None:
    admin = live_broker.admin()
    node = register_node(live_broker.url, live_broker.admin_token, "student", with_key=False)
    issued = admin.post(f"/v1/nodes/{node.name}/tokens", json={"ttl_days": 7}).json()
    http = httpx.Client(base_url=live_broker.url, headers={"Authorization": f"Bearer {issued['token']}"})
    r = http.post("/v1/me/token", json={"ttl_days": 3650})
    assert (r.status_code, r.json()["code"]) == (400, "ttl_too_long"), r.text
    assert http.get("/v1/me").status_code == 200  # a refused rotation revokes nothing
    # Rotation changes the secret, not the lifetime: rotating again and again never moves the expiry.
    for _ in range(3):
        rotated = http.post("/v1/me/token", json={}).json()
        assert rotated["expires_at"] == issued["expires_at"]
        http.headers["Authorization"] = f"Bearer {rotated['token']}"
    shorter = http.post("/v1/me/token", json={"ttl_days": 1}).json()  # shortening is allowed
    lifetime = datetime.fromisoformat(shorter["expires_at"]) - datetime.fromisoformat(shorter["created_at"])
    assert timedelta(hours=23) < lifetime <= timedelta(days=1)


def test_json_bodies_are_capped_and_auth_comes_first(live_broker: LiveBroker) -> None:
    admin = live_broker.admin()
    cap = live_broker.state.settings.max_json_body_bytes  # type: ignore[attr-defined]
    huge = b'{"name": "' + b"x" * cap + b'", "role": "student"}'
    r = admin.post("/v1/nodes", content=huge, headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()["code"]) == (413, "body_too_large"), r.text

    def chunked():  # no Content-Length: refused once the cap is passed
        for i in range(0, len(huge), 64 << 10):
            yield huge[i : i + 64 << 10]

    r = admin.post("/v1/nodes", content=chunked(), headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()["code"]) == (413, "body_too_large"), r.text
    anonymous = httpx.post(f"{live_broker.url}/v1/nodes", content=huge, headers={"Content-Type": "application/json"})
    assert (anonymous.status_code, anonymous.json()["code"]) == (401, "missing_token")
    assert anonymous.headers["WWW-Authenticate"] == "Bearer"
    assert admin.get("/v1/nodes").status_code == 200  # the broker is fine afterwards
