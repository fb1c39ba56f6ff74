"""Admin surface and operations: tokens (expiry, rotation, revocation), the audit log, stats,
/readyz, /metrics, and an OpenAPI document an admin can work from."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from sqlalchemy import update

from m2kt.benchmarks.harness.brokers import register_node, unique
from m2kt.benchmarks.harness.packets import packet_bytes
from m2kt.broker.models import ApiToken
from tests.conftest import LiveBroker


def test_token_expiry_rotation_and_revocation(live_broker: LiveBroker) -> None:
    admin = live_broker.admin()
    node = register_node(live_broker.url, live_broker.admin_token, "student", with_key=False)
    assert node.http.get("/v1/me").json()["node"] == node.name

    rotated = admin.post(f"/v1/nodes/{node.name}/tokens", json={"ttl_days": 30}).json()
    assert rotated["token"].startswith("m2kt_") and rotated["expires_at"]
    fresh = httpx.Client(base_url=live_broker.url, headers={"Authorization": f"Bearer {rotated['token']}"})
    assert fresh.get("/v1/me").status_code == 200

    with live_broker.state.sessions.begin() as session:  # type: ignore[attr-defined]
        session.execute(
            update(ApiToken)
            .where(ApiToken.id == rotated["id"])
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    expired = fresh.get("/v1/me")
    assert (expired.status_code, expired.json()["code"]) == (401, "token_expired")

    listed = admin.get(f"/v1/nodes/{node.name}/tokens").json()
    assert len(listed) == 2 and all("token" not in t or t["token"] is None for t in listed)
    first = listed[0]["id"]
    assert admin.delete(f"/v1/tokens/{first}").json()["revoked_at"]
    revoked = node.http.get("/v1/me")
    assert (revoked.status_code, revoked.json()["code"]) == (401, "token_revoked")

    actions = [e["action"] for e in admin.get("/v1/admin/audit", params={"limit": 50}).json()]
    assert "token.revoked" in actions and "token.issued" in actions and "node.created" in actions


def test_non_admins_cannot_use_admin_routes(live_broker: LiveBroker) -> None:
    teacher = register_node(live_broker.url, live_broker.admin_token, "teacher", with_key=False)
    for method, path in [
        ("GET", "/v1/admin/stats"),
        ("GET", "/v1/admin/audit"),
        ("GET", "/v1/nodes"),
        ("POST", "/v1/packets/" + "0" * 64 + "/quarantine"),
        ("PUT", "/v1/admin/flagged-concepts/x"),
    ]:
        r = teacher.http.request(method, path, json={"d_model": 2, "labels": ["a"], "directions": [[1, 0]]})
        assert (r.status_code, r.json()["code"]) == (403, "insufficient_scope"), (method, path, r.text)


def test_node_names_are_unique_and_scopes_checked(live_broker: LiveBroker) -> None:
    admin = live_broker.admin()
    name = unique("dup")
    assert admin.post("/v1/nodes", json={"name": name, "role": "teacher"}).status_code == 201
    r = admin.post("/v1/nodes", json={"name": name, "role": "teacher"})
    assert (r.status_code, r.json()["code"]) == (409, "node_exists")
    r = admin.post("/v1/nodes", json={"name": unique("bad"), "role": "teacher", "scopes": ["root"]})
    assert (r.status_code, r.json()["code"]) == (400, "invalid_scope")


def test_stats_readyz_and_metrics(live_broker: LiveBroker, tmp_path: Path) -> None:
    teacher = register_node(live_broker.url, live_broker.admin_token, "teacher")
    topic = unique("ops")
    assert (
        teacher.http.post(f"/v1/topics/{topic}/packets", content=packet_bytes(tmp_path, teacher.key, topic)).status_code
        == 201
    )
    stats = live_broker.admin().get("/v1/admin/stats").json()
    assert stats["packets"]["accepted"] >= 1 and stats["bytes_stored"] > 0 and stats["nodes"]["teacher"] >= 1
    assert httpx.get(f"{live_broker.url}/readyz").json()["status"] == "ready"
    metrics = httpx.get(f"{live_broker.url}/metrics").text
    for name in (
        "m2kt_http_requests_total",
        "m2kt_bytes_in_total",
        "m2kt_upload_seconds_bucket",
        "m2kt_packets_accepted_total",
    ):
        assert name in metrics
    assert 'route="/v1/topics/{topic}/packets",status="201"' in metrics  # labelled by route template


def test_openapi_documents_every_route(live_broker: LiveBroker) -> None:
    spec = httpx.get(f"{live_broker.url}/openapi.json").json()
    assert spec["components"]["securitySchemes"]["token"]["scheme"] == "bearer"
    public = {"/healthz", "/readyz", "/metrics"}
    operations = [(path, method, op) for path, item in spec["paths"].items() for method, op in item.items()]
    assert len(operations) >= 30
    for path, method, op in operations:
        assert op.get("summary"), f"{method} {path} has no summary"
        if path not in public:
            assert op.get("security") == [{"token": []}], f"{method} {path} is not marked as needing a token"
            documented = set(op["responses"])
            assert "401" in documented, f"{method} {path} does not document 401"
            assert op["responses"]["401"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    upload = spec["paths"]["/v1/topics/{topic}/packets"]["post"]
    assert "application/octet-stream" in upload["requestBody"]["content"]
    assert {"400", "413", "422", "503"} <= set(upload["responses"])
