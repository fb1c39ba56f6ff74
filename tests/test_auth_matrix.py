"""The authorisation matrix: every route of the live broker's OpenAPI document, tried with no token,
a garbage token, an expired, a revoked and a disabled node's token, a token of the wrong role or topic,
and the right token. Refusals are asserted by status, ``code`` and ``WWW-Authenticate``.

A route in the OpenAPI document but not in ``EXPECTED`` fails the suite, so a new route cannot skip
the matrix. ``pytest -s tests/test_auth_matrix.py`` prints the matrix as a Markdown table.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from m2kt.benchmarks.harness.brokers import register_node, unique
from m2kt.benchmarks.harness.packets import packet_bytes
from m2kt.broker.models import ApiToken
from m2kt.format.key_proof import prove_key
from m2kt.format.keys import SigningKey
from m2kt.sdk import calls
from tests.conftest import LiveBroker

Route = tuple[str, str]  # (method, path template), as in the OpenAPI document

# What a route needs. PUBLIC: nothing (a token, even a bad one, is ignored); ANY: any valid token;
# ADMIN: the admin scope; READ / RECEIPT / KEYS: that scope; PUBLISH: publish:<pattern> matching {topic};
# REGISTRY: 'read' or 'keys' (the key registry is not for a token that may only post receipts).
PUBLIC, ANY, ADMIN, READ, RECEIPT, KEYS, PUBLISH = "public", "any", "admin", "read", "receipt", "keys", "publish"
REGISTRY = "registry"

EXPECTED: dict[Route, str] = {
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    ("POST", "/v1/nodes"): ADMIN,
    ("GET", "/v1/nodes"): ADMIN,
    ("GET", "/v1/me"): ANY,
    ("POST", "/v1/me/token"): ANY,  # rotate your own token: same scopes, the one used is revoked
    ("POST", "/v1/nodes/{name}/tokens"): ADMIN,
    ("GET", "/v1/nodes/{name}/tokens"): ADMIN,
    ("POST", "/v1/nodes/{name}/disable"): ADMIN,  # on a spare node, so the matrix's own nodes stay usable
    ("POST", "/v1/nodes/{name}/enable"): ADMIN,
    ("DELETE", "/v1/tokens/{token_id}"): ADMIN,
    ("POST", "/v1/keys"): KEYS,
    ("GET", "/v1/keys"): REGISTRY,
    ("GET", "/v1/keys/{fingerprint}"): REGISTRY,
    ("POST", "/v1/keys/{fingerprint}/revoke"): KEYS,  # and the key's owner (or an admin)
    ("DELETE", "/v1/keys/{fingerprint}"): KEYS,  # and the key's owner (or an admin); on a spare key
    ("GET", "/v1/topics"): READ,
    ("GET", "/v1/topics/{topic}"): READ,
    ("PATCH", "/v1/topics/{topic}"): ADMIN,
    ("POST", "/v1/topics/{topic}/packets"): PUBLISH,
    ("GET", "/v1/topics/{topic}/packets"): READ,
    ("GET", "/v1/topics/{topic}/events"): READ,
    ("GET", "/v1/packets/{packet_id}"): READ,
    ("GET", "/v1/packets/{packet_id}/blob"): READ,
    ("GET", "/v1/packets/{packet_id}/lineage"): READ,
    ("POST", "/v1/packets/{packet_id}/receipts"): RECEIPT,
    ("GET", "/v1/packets/{packet_id}/receipts"): READ,
    ("POST", "/v1/packets/{packet_id}/quarantine"): ADMIN,
    ("POST", "/v1/packets/{packet_id}/release"): ADMIN,
    ("PUT", "/v1/subscriptions/{name}"): READ,
    ("GET", "/v1/subscriptions"): ANY,  # the caller's own subscriptions: names and cursors, no packets
    ("GET", "/v1/subscriptions/{name}"): ANY,
    ("GET", "/v1/subscriptions/{name}/packets"): READ,  # packet records, like GET /v1/topics/{topic}/packets
    ("POST", "/v1/subscriptions/{name}/ack"): ANY,
    ("PUT", "/v1/admin/flagged-concepts/{name}"): ADMIN,
    ("GET", "/v1/admin/flagged-concepts"): ADMIN,
    ("DELETE", "/v1/admin/flagged-concepts/{name}"): ADMIN,
    ("GET", "/v1/admin/stats"): ADMIN,
    ("GET", "/v1/admin/audit"): ADMIN,
    ("POST", "/v1/admin/gc"): ADMIN,
}

KINDS = (
    "none",
    "garbage",
    "expired",
    "revoked",
    "disabled",
    "wrong_role",
    "wrong_topic",
    "right",
    "bad_body",
    "bad_json",
    "garbage_bad_json",
    "role_bad_body",
)
# none..disabled: refused at authentication (401) whatever the route needs (the expired, revoked and
# disabled tokens are admin tokens, so nothing but their state can refuse them). Routes with a JSON body
# only: bad_body / bad_json: no token and a schema-invalid / unparsable body: still 401 (FastAPI parses a
# JSON body before it runs dependencies; the broker's request guard and error handler put auth first);
# garbage_bad_json: an unknown token and an unparsable body: 401; role_bad_body: the wrong role's token
# and a schema-invalid body: still 403 (scope checks are dependencies, which run before body validation).
BODY_KINDS = ("bad_body", "bad_json", "garbage_bad_json", "role_bad_body")
AUTH_FAILURES = {
    "none": "missing_token",
    "garbage": "invalid_token",
    "expired": "token_expired",
    "revoked": "token_revoked",
    "disabled": "node_disabled",
    "bad_body": "missing_token",
    "bad_json": "missing_token",
    "garbage_bad_json": "invalid_token",
}
WRONG_ROLE = {
    ADMIN: "teacher",
    PUBLISH: "student",
    RECEIPT: "teacher",
    KEYS: "narrow",
    READ: "narrow",
    REGISTRY: "narrow",
}
RIGHT = {
    PUBLIC: "none",
    ANY: "narrow",  # the least-privileged valid token
    ADMIN: "admin",
    PUBLISH: "teacher",
    RECEIPT: "student",
    KEYS: "student",
    READ: "student",
    REGISTRY: "student",
}
RIGHT_OVERRIDES: dict[Route, str] = {("POST", "/v1/me/token"): "fresh"}  # rotation revokes the token it used

TOPIC = "auth.matrix"
FLAGGED_SET = "auth-matrix-set"
SUBSCRIPTION = "auth-matrix-sub"


@dataclass(frozen=True)
class Expect:
    """A refusal (status and code), or ``allowed``: anything but 401/403."""

    status: int = 0
    code: str | None = None
    allowed: bool = False

    def __str__(self) -> str:
        return "not 401/403" if self.allowed else f"{self.status} {self.code}"


def json_body_routes() -> set[Route]:
    return BODIES.keys() - RAW_BODY_ROUTES


def expectation(route: Route, kind: str) -> Expect | None:
    """What ``kind`` of token must get on ``route``; None where the combination does not apply."""
    need = EXPECTED[route]
    if kind in BODY_KINDS and route not in json_body_routes():
        return None
    if need == PUBLIC:
        return Expect(200) if kind in ("none", "garbage", "expired", "revoked", "disabled", "right") else None
    if kind in AUTH_FAILURES:
        return Expect(401, AUTH_FAILURES[kind])
    if kind in ("wrong_role", "role_bad_body"):
        return Expect(403, "insufficient_scope") if need in WRONG_ROLE else None
    if kind == "wrong_topic":
        return Expect(403, "insufficient_scope") if need == PUBLISH else None
    return Expect(allowed=True)


def cells() -> Iterator[Any]:
    for route in EXPECTED:
        for kind in KINDS:
            if expectation(route, kind) is None:
                continue
            yield pytest.param(route, kind, id=f"{route[0]}-{route[1]}-{kind}")


# ----------------------------------------------------------------------------- the tokens and values


@dataclass
class Matrix:
    """Everything the cells need, made once per module."""

    broker: LiveBroker
    http: httpx.Client
    served: set[Route]
    openapi: dict[str, Any]
    tokens: dict[str, str]
    values: dict[str, str]
    packet: bytes
    results: dict[tuple[Route, str], tuple[int, str | None, str]] = field(default_factory=dict)

    def fresh_token(self) -> str:
        """A new receipt-only token of the student node (for the route that revokes the token it uses)."""
        return issue(self.broker, self.values["student"], ["receipt"])["token"]


def issue(broker: LiveBroker, node: str, scopes: list[str] | None = None) -> dict[str, Any]:
    with broker.admin() as admin:
        r = admin.post(f"/v1/nodes/{node}/tokens", json={"scopes": scopes} if scopes else {})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def admin_node(broker: LiveBroker) -> tuple[str, str]:
    """A fresh admin-role node: (name, token)."""
    with broker.admin() as admin:
        r = admin.post("/v1/nodes", json={"name": unique("auth-admin"), "role": "admin"})
    assert r.status_code == 201, r.text
    return r.json()["node"]["name"], r.json()["token"]["token"]


def register_spare(broker: LiveBroker) -> str:
    """A node only the disable / enable routes touch."""
    with broker.admin() as admin:
        r = admin.post("/v1/nodes", json={"name": unique("auth-spare"), "role": "student"})
    assert r.status_code == 201, r.text
    return str(r.json()["node"]["name"])


def dead_tokens(broker: LiveBroker) -> dict[str, str]:
    """Admin tokens refused only for their state: expired, revoked, or of a disabled node."""
    name, _ = admin_node(broker)
    expired, revoked = issue(broker, name), issue(broker, name)
    disabled_name, disabled = admin_node(broker)
    with broker.state.sessions.begin() as session:  # type: ignore[attr-defined]
        past = datetime.now(UTC) - timedelta(seconds=1)
        session.execute(update(ApiToken).where(ApiToken.id == expired["id"]).values(expires_at=past))
    with broker.admin() as admin:
        assert admin.delete(f"/v1/tokens/{revoked['id']}").status_code == 200
        assert admin.post(f"/v1/nodes/{disabled_name}/disable").json()["disabled_at"]
    return {"expired": expired["token"], "revoked": revoked["token"], "disabled": disabled}


def upload(broker: LiveBroker, token: str, data: bytes) -> str:
    headers = {"Authorization": f"Bearer {token}"}
    r = httpx.post(f"{broker.url}/v1/topics/{TOPIC}/packets", content=data, headers=headers, timeout=60)
    assert r.status_code in (200, 201), r.text
    return r.json()["id"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def matrix(live_broker: LiveBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    broker, tmp = live_broker, tmp_path_factory.mktemp("auth-matrix")
    http = httpx.Client(base_url=broker.url, timeout=60)
    teacher = register_node(broker.url, broker.admin_token, "teacher")
    student = register_node(broker.url, broker.admin_token, "student")
    other = register_node(broker.url, broker.admin_token, "teacher", scopes=["read", "keys", "publish:other.*"])
    assert teacher.key is not None and student.key is not None
    spare = SigningKey.generate()  # the student's second key, dropped by the DELETE cell
    spare_key = spare.verify_key
    r = student.http.post("/v1/keys", json=calls.register_key(prove_key(spare, student.name)).json)
    assert r.status_code == 201, r.text
    packet = packet_bytes(tmp, teacher.key, TOPIC)
    packet_id = upload(broker, teacher.token, packet)
    spare_id = upload(broker, teacher.token, packet_bytes(tmp, teacher.key, TOPIC, seed=1))
    r = student.http.put(f"/v1/subscriptions/{SUBSCRIPTION}", json={"topic": TOPIC})
    assert r.status_code in (200, 201), r.text
    for node in (teacher, student, other):
        node.http.close()
    tokens = {
        "admin": broker.admin_token,
        "teacher": teacher.token,
        "student": student.token,
        "narrow": issue(broker, student.name, ["receipt"])["token"],  # the student node, no read / keys
        "other_topic": other.token,
        "garbage": "m2kt_" + uuid.uuid4().hex + uuid.uuid4().hex[:11],
        **dead_tokens(broker),
    }
    values = {
        "topic": TOPIC,
        "packet_id": packet_id,
        "spare_id": spare_id,  # quarantined and released by the admin cells, so readers never see it
        "fingerprint": student.key.verify_key.fingerprint,
        "spare_fingerprint": spare_key.fingerprint,
        "token_id": str(issue(broker, teacher.name)["id"]),  # revoked by the admin cell
        "node": teacher.name,
        "spare_node": register_spare(broker),
        "student": student.name,
    }
    openapi = http.get("/openapi.json").json()
    served = {(m.upper(), p) for p, item in openapi["paths"].items() for m in item if m in HTTP_METHODS}
    m = Matrix(broker, http, served, openapi, tokens, values, packet)
    yield m
    http.close()
    print_matrix(m)


HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


# ----------------------------------------------------------------------------- requests


def _upload(m: Matrix) -> dict[str, Any]:
    return {"content": m.packet, "headers": {"Content-Type": "application/octet-stream"}}


def _json(body: Any) -> Callable[[Matrix], dict[str, Any]]:
    def make(m: Matrix) -> dict[str, Any]:
        return {"json": body(m) if callable(body) else body}

    return make


BODIES: dict[Route, Callable[[Matrix], dict[str, Any]]] = {
    ("POST", "/v1/nodes"): _json(lambda m: {"name": unique("auth-made"), "role": "student"}),
    ("POST", "/v1/me/token"): _json({}),
    ("POST", "/v1/nodes/{name}/tokens"): _json({"ttl_days": 1}),
    ("POST", "/v1/keys"): _json(
        lambda m: calls.register_key(prove_key(SigningKey.generate(), m.values["student"])).json
    ),
    ("POST", "/v1/keys/{fingerprint}/revoke"): _json({"reason": "auth matrix"}),
    ("PATCH", "/v1/topics/{topic}"): _json({"safety_threshold": None}),
    ("POST", "/v1/topics/{topic}/packets"): _upload,
    ("POST", "/v1/packets/{packet_id}/receipts"): _json({"decision": "accepted", "scores": {"acc": 1.0}}),
    ("PUT", "/v1/subscriptions/{name}"): _json({"topic": TOPIC}),
    ("POST", "/v1/subscriptions/{name}/ack"): _json({"cursor": 0}),
    # one label, a 3-number direction for d_model=2: valid JSON, refused (400) by the admin route, stores nothing
    ("PUT", "/v1/admin/flagged-concepts/{name}"): _json({"d_model": 2, "labels": ["a"], "directions": [[1, 0, 0]]}),
}
RAW_BODY_ROUTES: set[Route] = {("POST", "/v1/topics/{topic}/packets")}
QUERIES: dict[Route, dict[str, str]] = {("POST", "/v1/admin/gc"): {"dry_run": "true"}}


def concrete_path(route: Route, m: Matrix) -> str:
    """The path template with plausible values; fails on a parameter this test has no value for."""
    method, template = route
    name = m.values["node"]
    if template.endswith(("/disable", "/enable")):
        name = m.values["spare_node"]
    elif template.startswith("/v1/subscriptions"):
        name = SUBSCRIPTION
    elif template.startswith("/v1/admin/flagged-concepts"):
        name = FLAGGED_SET
    values = {**m.values, "name": name}
    if template.endswith(("/quarantine", "/release")):
        values["packet_id"] = m.values["spare_id"]
    if route == ("DELETE", "/v1/keys/{fingerprint}"):
        values["fingerprint"] = m.values["spare_fingerprint"]
    params = re.findall(r"{(\w+)}", template)
    unknown = [p for p in params if p not in values]
    assert not unknown, f"{method} {template}: add a value for {unknown} to the auth matrix"
    return re.sub(r"{(\w+)}", lambda g: values[g.group(1)], template)


def token_for(route: Route, kind: str, m: Matrix) -> str | None:
    need = EXPECTED[route]
    if kind in ("none", "bad_body", "bad_json"):
        return None
    if kind in ("wrong_role", "role_bad_body"):
        return m.tokens[WRONG_ROLE[need]]
    if kind == "wrong_topic":
        return m.tokens["other_topic"]
    if kind == "garbage_bad_json":
        return m.tokens["garbage"]
    if kind == "right":
        who = RIGHT_OVERRIDES.get(route, RIGHT[need])
        return None if who == "none" else m.fresh_token() if who == "fresh" else m.tokens[who]
    return m.tokens[kind]


def request_kwargs(route: Route, kind: str, m: Matrix) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"params": QUERIES.get(route, {}), "headers": {}}
    if kind in ("bad_body", "role_bad_body"):
        kwargs["json"] = []  # valid JSON, but no request model is a list
    elif kind in ("bad_json", "garbage_bad_json"):
        kwargs["content"] = b'{"broken'
        kwargs["headers"]["Content-Type"] = "application/json"
    elif route in BODIES:
        extra = BODIES[route](m)
        kwargs["headers"].update(extra.pop("headers", {}))
        kwargs.update(extra)
    token = token_for(route, kind, m)
    if token is not None:
        kwargs["headers"]["Authorization"] = f"Bearer {token}"
    return kwargs


@dataclass
class Answer:
    status: int
    code: str | None
    www_authenticate: str | None


def send(route: Route, kind: str, m: Matrix) -> Answer:
    """One request; a streamed answer (SSE) is closed after its headers."""
    with m.http.stream(route[0], concrete_path(route, m), **request_kwargs(route, kind, m)) as r:
        code = None
        if r.headers.get("content-type", "").startswith("application/json"):
            body = r.read()
            parsed = httpx.Response(200, content=body).json() if body else None
            code = parsed.get("code") if isinstance(parsed, dict) else None
        return Answer(r.status_code, code, r.headers.get("www-authenticate"))


def matches(expect: Expect, got: Answer) -> bool:
    if expect.allowed:
        return got.status not in (401, 403)
    if (got.status, got.code if expect.code else None) != (expect.status, expect.code):
        return False
    return got.status != 401 or got.www_authenticate == "Bearer"


# ----------------------------------------------------------------------------- the tests


def test_every_route_is_in_the_matrix(matrix: Matrix) -> None:
    """The table and the OpenAPI document list the same routes; JSON-body routes have a body here."""
    missing = sorted(matrix.served - EXPECTED.keys())
    assert not missing, f"routes with no row in the auth matrix (add them to EXPECTED): {missing}"
    gone = sorted(EXPECTED.keys() - matrix.served)
    assert not gone, f"EXPECTED lists routes the broker no longer serves: {gone}"
    for path, item in matrix.openapi["paths"].items():
        for method, op in item.items():
            content = op.get("requestBody", {}).get("content", {}) if isinstance(op, dict) else {}
            if content:
                assert (method.upper(), path) in BODIES, f"{method.upper()} {path} takes a body: add one to BODIES"
            if "application/json" in content:
                assert (method.upper(), path) in json_body_routes(), f"{method.upper()} {path}: a JSON body"


@pytest.mark.parametrize(("route", "kind"), list(cells()))
def test_cell(matrix: Matrix, route: Route, kind: str) -> None:
    """One route, one kind of token: the expected refusal, or (the right token) no 401/403."""
    expect = expectation(route, kind)
    assert expect is not None
    got = send(route, kind, matrix)
    ok = matches(expect, got)
    verdict = "ok" if ok else "unexpected"
    matrix.results[(route, kind)] = (got.status, got.code, verdict)
    assert ok, (
        f"{route[0]} {route[1]} with {kind} token: expected {expect}, got {got.status} {got.code} "
        f"(WWW-Authenticate: {got.www_authenticate})"
    )


def test_rotating_your_own_token_keeps_scopes_and_revokes_it(matrix: Matrix) -> None:
    """POST /v1/me/token: the new token has the old one's scopes; the old one is then refused."""
    old = matrix.fresh_token()
    r = matrix.http.post("/v1/me/token", json={}, headers={"Authorization": f"Bearer {old}"})
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["scopes"] == ["receipt"] and new["token"] != old
    again = matrix.http.get("/v1/me", headers={"Authorization": f"Bearer {old}"})
    assert (again.status_code, again.json()["code"]) == (401, "token_revoked")
    me = matrix.http.get("/v1/me", headers={"Authorization": f"Bearer {new['token']}"}).json()
    assert me["scopes"] == ["receipt"] and me["node"] == matrix.values["student"]


# ----------------------------------------------------------------------------- the printed matrix

SHORT = {
    "missing_token": "missing",
    "invalid_token": "invalid",
    "token_expired": "expired",
    "token_revoked": "revoked",
    "node_disabled": "disabled",
    "insufficient_scope": "scope",
    "invalid_request": "invalid_request",
}


def cell_text(result: tuple[int, str | None, str] | None, route: Route, kind: str) -> str:
    if expectation(route, kind) is None:
        return "·"
    if result is None:
        return "skipped"
    status, code, verdict = result
    text = f"{status} {SHORT.get(code or '', code or '')}".strip()
    return {"ok": text, "unexpected": f"**✗ {text}**"}[verdict]


COLUMNS = {
    "bad_body": "none + bad body",
    "bad_json": "none + broken JSON",
    "garbage_bad_json": "garbage + broken JSON",
    "role_bad_body": "wrong role + bad body",
}


def print_matrix(m: Matrix) -> None:
    """The route × token-kind table, as Markdown, and the count of cells as expected."""
    lines = ["| need | route | " + " | ".join(COLUMNS.get(k, k) for k in KINDS) + " |"]
    lines.append("|" + "---|" * (len(KINDS) + 2))
    for route, need in EXPECTED.items():
        row = [cell_text(m.results.get((route, k)), route, k) for k in KINDS]
        lines.append(f"| {need} | `{route[0]} {route[1]}` | " + " | ".join(row) + " |")
    verdicts = [v for _, _, v in m.results.values()]
    unexpected = verdicts.count("unexpected")
    print("\n\n## Authorisation matrix\n")
    print("\n".join(lines))
    print(
        "\n·: not applicable. 401/403 codes shortened (missing = missing_token, invalid = invalid_token, "
        "scope = insufficient_scope, …). right: anything but 401/403. "
        "**✗**: not as expected."
    )
    if unexpected == 0:
        print(f"\n{len(verdicts)} cells, all as expected")
    else:
        print(f"\n{len(verdicts)} cells: {verdicts.count('ok')} as expected, {unexpected} not (✗)")
