"""SDK behaviour that needs no broker: public names, error mapping, retries and Retry-After."""

from __future__ import annotations

import asyncio

import httpx
import pytest

import m2kt
from m2kt import (
    AsyncBrokerClient,
    AuthError,
    BrokerClient,
    M2KTError,
    NotFound,
    RetryPolicy,
    ServiceUnavailable,
    TransportError,
    ValidationError,
)
from m2kt.sdk.retry import parse_retry_after

PUBLIC = {
    "AsyncBrokerClient",
    "AuthError",
    "BrokerClient",
    "BrokerError",
    "Conflict",
    "Delivery",
    "Event",
    "EventPage",
    "FetchedPacket",
    "KeyRecord",
    "Lineage",
    "M2KTError",
    "MalformedRequest",
    "Manifest",
    "ManifestBody",
    "NotFound",
    "Packet",
    "PacketError",
    "PacketFormatError",
    "PacketRecord",
    "PermissionDenied",
    "RateLimited",
    "Receipt",
    "RetryPolicy",
    "ServiceUnavailable",
    "SigningKey",
    "SubscriptionRecord",
    "TooLarge",
    "TopicRecord",
    "TransportError",
    "ValidationError",
    "VerificationError",
    "VerifyKey",
    "__version__",
    "generate_keypair",
    "load_signing_key",
    "load_verify_key",
    "open_packet",
    "verify_packet",
    "write_packet",
}


def test_public_names_are_pinned() -> None:
    assert set(m2kt.__all__) == PUBLIC
    for name in m2kt.__all__:
        assert getattr(m2kt, name) is not None
    assert all(
        issubclass(getattr(m2kt, n), M2KTError)
        for n in (
            "AuthError",
            "NotFound",
            "ValidationError",
            "TransportError",
            "VerificationError",
            "ServiceUnavailable",
        )
    )


ME = {"node": "n", "role": "student", "scopes": ["read"], "token_expires_at": None}


class Script:
    """A mock broker answering from a list of (status, headers, json); records what was asked."""

    def __init__(self, *answers: tuple[int, dict[str, str], object]) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status, headers, body = self.answers.pop(0)
        if isinstance(body, Exception):
            raise body
        return httpx.Response(status, headers=headers, json=body)


def run(kind: str, script: Script, method: str, *args: object, policy: RetryPolicy | None = None):  # type: ignore[no-untyped-def]
    slept: list[float] = []
    if kind == "sync":
        c = BrokerClient("http://broker", "t", transport=httpx.MockTransport(script), retry=policy, sleep=slept.append)
        try:
            return getattr(c, method)(*args), slept
        finally:
            c.close()

    async def go():  # type: ignore[no-untyped-def]
        async def sleep(s: float) -> None:
            slept.append(s)

        async with AsyncBrokerClient(
            "http://broker", "t", transport=httpx.MockTransport(script), retry=policy, sleep=sleep
        ) as c:
            return await getattr(c, method)(*args), slept

    return asyncio.run(go())


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def test_idempotent_calls_retry_and_honour_retry_after(kind: str) -> None:
    script = Script(
        (503, {"Retry-After": "2"}, {"code": "storage_unavailable", "message": "s3 down"}),
        (429, {"Retry-After": "1"}, {"code": "rate_limited", "message": "slow down"}),
        (200, {}, ME),
    )
    result, slept = run(kind, script, "me")
    assert result.node == "n" and slept == [2.0, 1.0] and len(script.requests) == 3
    assert script.requests[0].headers["authorization"] == "Bearer t"


def test_connection_errors_back_off_with_jitter_then_give_up(kind: str) -> None:
    boom = httpx.ConnectError("refused")
    script = Script(*[(0, {}, boom)] * 4)
    policy = RetryPolicy(attempts=4, backoff=0.5, max_backoff=1.5)
    with pytest.raises(TransportError):
        run(kind, script, "me", policy=policy)
    assert len(script.requests) == 4


def test_backoff_grows_exponentially_and_is_capped() -> None:
    policy = RetryPolicy(backoff=0.5, max_backoff=3.0, jitter=False)
    assert [policy.delay(a) for a in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    jittered = RetryPolicy(backoff=0.5, max_backoff=3.0)
    assert all(0 <= jittered.delay(3) <= 3.0 for _ in range(100))
    assert policy.delay(0, retry_after=120) == 60.0  # a broker cannot park a client forever
    assert parse_retry_after("7") == 7.0 and parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("soon") is None


def test_non_idempotent_calls_are_sent_once(kind: str) -> None:
    script = Script((503, {}, {"code": "database_unavailable", "message": "db down"}))
    with pytest.raises(ServiceUnavailable) as err:
        run(kind, script, "post_receipt", "a" * 64, "accepted")
    assert err.value.code == "database_unavailable" and len(script.requests) == 1


@pytest.mark.parametrize(
    ("status", "code", "exc"),
    [
        pytest.param(401, "token_expired", AuthError, id="401"),
        pytest.param(404, "packet_not_found", NotFound, id="404"),
        pytest.param(422, "digest_mismatch", ValidationError, id="422"),
    ],
)
def test_errors_carry_the_brokers_code(kind: str, status: int, code: str, exc: type) -> None:
    script = Script((status, {}, {"code": code, "message": "because"}))
    with pytest.raises(exc) as err:
        run(kind, script, "packet", "a" * 64)
    assert (err.value.status, err.value.code, err.value.message) == (status, code, "because")
    assert len(script.requests) == 1  # 4xx other than 429 are not retried


def test_login_config_is_private_and_env_overrides(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from m2kt.sdk.config import load_config, save_config

    monkeypatch.setenv("M2KT_CONFIG", str(tmp_path / "cfg" / "config.json"))
    monkeypatch.delenv("M2KT_URL", raising=False)
    monkeypatch.delenv("M2KT_TOKEN", raising=False)
    path = save_config("http://b:8000", "m2kt_secret")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert load_config().url == "http://b:8000" and load_config().token == "m2kt_secret"
    monkeypatch.setenv("M2KT_URL", "http://other")
    assert load_config().url == "http://other"
    assert BrokerClient().base_url == "http://other"


def test_named_profiles_keep_several_identities_apart(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A teacher and a student on one machine: each token under its own profile, the default kept (issue 19)."""
    from m2kt.errors import M2KTError
    from m2kt.sdk.config import load_config, profiles, save_config

    monkeypatch.setenv("M2KT_CONFIG", str(tmp_path / "config.json"))
    for name in ("M2KT_URL", "M2KT_TOKEN", "M2KT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    save_config("http://b:8000", "m2kt_admin")
    save_config("http://b:8000", "m2kt_teacher", "teacher")
    path = save_config("http://b:8000", "m2kt_student", "student")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert load_config().token == "m2kt_admin"
    assert load_config("teacher").token == "m2kt_teacher" and load_config("student").token == "m2kt_student"
    assert profiles() == {"student": "http://b:8000", "teacher": "http://b:8000"}
    monkeypatch.setenv("M2KT_PROFILE", "student")
    assert load_config().token == "m2kt_student" and BrokerClient()._token == "m2kt_student"
    with pytest.raises(M2KTError, match="no profile 'nobody'.*m2kt login URL --token … --profile nobody"):
        load_config("nobody")
