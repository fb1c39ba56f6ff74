"""Issue 18, defects 10 and 11, on real brokers (uvicorn on a loopback socket; a subprocess where it matters).

* 10 — a token in a query string is refused (400 ``token_in_query``) before anything reads the request,
  and no token secret reaches the log, whatever the log level;
* 11 — strangers cannot exhaust descriptors or memory: idle connections past the cap are closed (or, when
  every connection is busy, the new one gets 503), a connection that sends no request head is closed after
  ``M2KT_HEADER_TIMEOUT_SECONDS``, a trickled request body gets 408 ``body_stalled``, a client that reads
  none of a large response is dropped, a stalled upload is refused (408 ``upload_stalled``) and leaves
  nothing behind, and one node's concurrent uploads and event streams are capped (429) without touching
  another's.

Timings: small settings so the tests run fast, generous polling deadlines so a busy machine cannot break
them; nothing asserts that something happened *quickly*.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from m2kt.benchmarks.harness.brokers import BrokerProcess, Node, register_node, uvicorn_thread
from m2kt.benchmarks.harness.packets import make_tensors, packet_bytes
from m2kt.broker.app import create_app
from m2kt.broker.logredact import RedactSecrets, redact
from m2kt.broker.settings import Settings
from m2kt.broker.storage import LocalStore, StagedUpload

DEADLINE = 60.0  # seconds: only ever an upper bound on waiting, never an expectation


# ----------------------------------------------------------------------------- helpers


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _connect(url: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", _port(url)), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _closed_by_server(sock: socket.socket, deadline: float) -> bool:
    """Read (and drop) whatever comes until the server closes the connection; False at the deadline."""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, min(0.5, deadline - time.monotonic())))
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


def _poll(condition: Callable[[], bool], what: str, deadline_s: float = DEADLINE) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {deadline_s:g} s for: {what}")
        time.sleep(0.05)


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _read_response(sock: socket.socket, deadline_s: float = DEADLINE) -> RawResponse:
    """One HTTP/1.1 response with a Content-Length body, read off a raw socket."""
    deadline = time.monotonic() + deadline_s
    data = b""
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep:
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            length = int(headers.get("content-length", "0"))
            if len(rest) >= length:
                return RawResponse(int(lines[0].split()[1]), headers, rest[:length])
        if time.monotonic() > deadline:
            raise AssertionError(f"no complete response within {deadline_s:g} s; got {data[:300]!r}")
        sock.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            raise AssertionError(f"the server closed the connection before a complete response; got {data[:300]!r}")
        data += chunk


def _start_upload(url: str, token: str, topic: str, data: bytes, send: int) -> socket.socket:
    """A packet upload that sends its head and the first ``send`` bytes of ``data``, then nothing more."""
    sock = _connect(url)
    head = (
        f"POST /v1/topics/{topic}/packets HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode()
    sock.sendall(head + data[:send])
    return sock


class SpyStore(LocalStore):
    """The embedded default's blob directory, remembering every upload it staged."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.staged: list[StagedUpload] = []

    def stage(self, final_key: str | None = None) -> StagedUpload:
        staged = super().stage(final_key)
        self.staged.append(staged)
        return staged


@dataclass
class Embedded:
    url: str
    admin_token: str
    app: Any
    data_dir: Path

    @property
    def store(self) -> SpyStore:
        return self.app.state.broker.storage  # type: ignore[no-any-return]

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.admin_token}"}, timeout=60)

    def node(self, role: str, **kw: Any) -> Node:
        return register_node(self.url, self.admin_token, role, **kw)


@contextmanager
def embedded_broker(tmp: Path, *, http: str = "auto", **settings: Any) -> Iterator[Embedded]:
    """The embedded default (SQLite, blobs in a directory) with ``settings``, served by uvicorn on loopback."""
    data_dir = tmp / f"broker-{uuid.uuid4().hex[:8]}"
    config = Settings(data_dir=data_dir, poll_fallback_seconds=0.5, sse_heartbeat_seconds=1.0, **settings)
    app = create_app(config, storage=SpyStore(data_dir / "blobs"))
    with uvicorn_thread(app, http=http) as url:
        yield Embedded(url, (data_dir / "admin-token").read_text().strip(), app, data_dir)


def _clean_env() -> dict[str, str]:
    """No M2KT_* from the outside: the subprocess runs the embedded default."""
    return {k: "" for k in os.environ if k.startswith("M2KT_") and not k.startswith("M2KT_TEST_")}


def _big_packet(tmp: Path, node: Node, topic: str, seed: int = 0) -> bytes:
    """A valid packet of about 2.5 MiB: more than one 1 MiB batch, so staging starts before it ends."""
    k, d = 4, 1 << 16
    assert node.key is not None
    return packet_bytes(tmp, node.key, topic, tensors=make_tensors(k=k, d=d, seed=seed), k=k, d=d)


# ----------------------------------------------------------------------------- defect 10: tokens and logs


@pytest.mark.parametrize("log_level", ["info", "trace"])
def test_token_in_query_is_refused_and_never_logged(tmp_path: Path, log_level: str) -> None:
    log_path = tmp_path / "broker.log"
    broker = BrokerProcess(_clean_env(), cwd=tmp_path, log_path=log_path, log_level=log_level).start()
    other_secret = "s3cr3t-" + uuid.uuid4().hex  # not token-shaped: refused and redacted by its name
    try:
        token = (tmp_path / "m2kt-data" / "admin-token").read_text().strip()
        bearer = {"Authorization": f"Bearer {token}"}
        refused = [
            httpx.get(f"{broker.url}/v1/topics?token={token}"),
            httpx.get(f"{broker.url}/v1/topics?after=0&access_token={token}", headers=bearer),
            httpx.get(f"{broker.url}/healthz?api_key={other_secret}"),
            httpx.get(f"{broker.url}/v1/topics?cursor={token}", headers=bearer),  # token-shaped value
            httpx.get(f"{broker.url}/v1/topics?token={quote(token, safe='')}"),
            httpx.post(f"{broker.url}/v1/nodes?password={other_secret}", json={"name": "x", "role": "student"}),
        ]
        for r in refused:
            assert r.status_code == 400, r.text
            body = r.json()
            assert body["code"] == "token_in_query"
            assert "Authorization: Bearer" in body["message"] and "rotate" in body["message"]
            assert token not in r.text and other_secret not in r.text
        # Requests the broker serves, or refuses for other reasons, with the token where it belongs —
        # or pasted into the path by mistake (redacted from the access log all the same).
        assert httpx.get(f"{broker.url}/v1/topics", headers=bearer).status_code == 200
        assert httpx.get(f"{broker.url}/v1/topics/{token}", headers=bearer).status_code in (400, 404, 422)
        unknown = {"Authorization": "Bearer m2kt_" + "x" * 43}
        assert httpx.get(f"{broker.url}/v1/topics", headers=unknown).status_code == 401
    finally:
        broker.stop()  # a clean exit flushes the log
    logged = log_path.read_text(errors="replace")
    assert "400" in logged and "[redacted]" in logged, logged[-2000:]  # the access log was captured
    for secret in (token, token.removeprefix("m2kt_"), quote(token, safe=""), other_secret, "x" * 43):
        assert secret not in logged, f"a secret reached the log: {secret[:8]}…"


def test_redaction_filter_keeps_access_lines_and_tracebacks_readable() -> None:
    from uvicorn.logging import AccessFormatter, DefaultFormatter

    token = "m2kt_" + "A1b2C3d4" * 5
    access = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", f"/v1/topics?limit=5&token={token}", "1.1", 400), None,
    )  # fmt: skip
    assert RedactSecrets().filter(access)
    line = AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s', use_colors=False).format(access)
    assert line.startswith('127.0.0.1:5000 - "GET /v1/topics?limit=5&token=[redacted] HTTP/1.1" 400')

    try:
        raise RuntimeError(f"cannot fetch https://broker/v1/topics?access_token={token}")
    except RuntimeError:
        failure = logging.LogRecord(
            "m2kt.broker", logging.ERROR, __file__, 1, "request with %s failed", (f"Bearer {token}",), sys.exc_info()
        )
    assert RedactSecrets().filter(failure)
    text = DefaultFormatter("%(levelprefix)s %(message)s", use_colors=False).format(failure)
    assert token not in text and "Bearer [redacted]" in text and "access_token=[redacted]" in text
    assert redact("after=5&limit=10 m2kt_t") == "after=5&limit=10 m2kt_t"  # nothing secret, nothing changed


# ----------------------------------------------------------------------------- defect 11: connections


def test_idle_connections_cannot_exhaust_descriptors_or_keep_a_request_out(tmp_path: Path) -> None:
    """The attack as reported, scaled down: ulimit -n 256, 400 connections that never send a byte."""
    env = {**_clean_env(), "M2KT_HEADER_TIMEOUT_SECONDS": "300"}  # the cap, not the timeout, does the work
    broker = BrokerProcess(env, cwd=tmp_path, log_path=tmp_path / "broker.log", max_open_files=256).start()
    idle: list[socket.socket] = []
    try:
        token = (tmp_path / "m2kt-data" / "admin-token").read_text().strip()
        for _ in range(400):
            idle.append(_connect(broker.url))
        r = httpx.get(f"{broker.url}/v1/topics", headers={"Authorization": f"Bearer {token}"}, timeout=DEADLINE)
        assert r.status_code == 200, r.text
        # Past the automatic cap (half of 256) the oldest idle connections were closed by the broker.
        deadline = time.monotonic() + DEADLINE
        closed = sum(_closed_by_server(s, deadline) for s in idle[: 400 - 128])
        assert closed == 400 - 128
        assert httpx.get(f"{broker.url}/healthz", timeout=DEADLINE).status_code == 200
    finally:
        for s in idle:
            s.close()
        broker.stop()
    assert "M2KT_MAX_CONNECTIONS" in (tmp_path / "broker.log").read_text()  # the cut was reported


def test_connections_past_the_cap_get_503_when_every_one_is_busy(tmp_path: Path) -> None:
    with embedded_broker(
        tmp_path, max_connections=3, header_timeout_seconds=300, body_idle_timeout_seconds=300
    ) as broker:
        limits = broker.app.state.connection_limits
        busy = []
        for _ in range(3):  # requests in progress: JSON bodies that never finish
            sock = _connect(broker.url)
            sock.sendall(
                f"POST /v1/nodes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {broker.admin_token}\r\n"
                "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode()
            )
            busy.append(sock)
        _poll(lambda: limits.busy_count == 3, "three busy connections")
        late = _connect(broker.url)  # answered at once, before it sends anything
        refused = _read_response(late)
        assert refused.status == 503 and refused.json()["code"] == "too_many_connections"
        assert refused.headers["connection"] == "close" and refused.headers["retry-after"] == "1"
        assert _closed_by_server(late, time.monotonic() + DEADLINE)
        busy.pop().close()
        _poll(lambda: limits.open_count < 3, "the closed connection to be let go")
        assert httpx.get(f"{broker.url}/healthz", timeout=DEADLINE).status_code == 200
        for sock in busy:
            sock.close()


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_connections_without_a_request_head_are_closed(tmp_path: Path, http: str) -> None:
    with embedded_broker(
        tmp_path, http=http, header_timeout_seconds=1, keepalive_timeout_seconds=1, max_connections=64
    ) as broker:
        silent = _connect(broker.url)  # never sends a byte
        slow = _connect(broker.url)  # a request head, one header line at a time, never finished
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        served = _connect(broker.url)  # one request served, then nothing: keep-alive, then head deadline
        served.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(served).status == 200
        served.sendall(b"GET /healthz HTTP/1.1\r\n")  # the next head, never finished

        deadline = time.monotonic() + DEADLINE
        slow_closed = False
        while not slow_closed and time.monotonic() < deadline:
            try:
                slow.sendall(b"X-Pad: 1\r\n")
            except (BrokenPipeError, ConnectionResetError):
                slow_closed = True
                break
            slow.settimeout(0.2)
            with contextlib.suppress(TimeoutError):
                slow_closed = slow.recv(1024) == b""
        assert slow_closed, "a request head sent a header at a time kept its connection open"
        assert _closed_by_server(silent, deadline), "a connection that sent nothing stayed open"
        assert _closed_by_server(served, deadline), "a half-sent second request kept its connection open"
        # A client that sends its request promptly is unaffected.
        assert httpx.get(f"{broker.url}/healthz", timeout=DEADLINE).status_code == 200
        for sock in (silent, slow, served):
            sock.close()


def test_a_client_that_reads_nothing_of_a_large_response_is_dropped(tmp_path: Path) -> None:
    """A response the client never reads must not hold its connection (and the buffered bytes) for good."""
    with embedded_broker(tmp_path, body_idle_timeout_seconds=1) as broker:
        limits = broker.app.state.connection_limits
        teacher = broker.node("teacher")
        k, d = 4, 1 << 19  # about 16 MiB: more than the socket buffers on both sides hold
        assert teacher.key is not None
        data = packet_bytes(tmp_path, teacher.key, "slow.read", tensors=make_tensors(k=k, d=d), k=k, d=d)
        assert teacher.http.post("/v1/topics/slow.read/packets", content=data).status_code == 201

        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        sock.settimeout(10)
        sock.connect(("127.0.0.1", _port(broker.url)))
        sock.sendall(
            f"GET /v1/packets/{hashlib.sha256(data).hexdigest()}/blob HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {teacher.token}\r\n\r\n".encode()
        )
        _poll(lambda: limits.send_stalled >= 1, "the stalled reader to be dropped")
        assert _closed_by_server(sock, time.monotonic() + DEADLINE)
        sock.close()
        assert teacher.http.get("/healthz").status_code == 200


# ----------------------------------------------------------------------------- defect 11: uploads and streams


def test_a_stalled_upload_gets_408_and_leaves_no_row_and_no_staged_blob(tmp_path: Path) -> None:
    with embedded_broker(tmp_path, body_idle_timeout_seconds=1) as broker:
        teacher = broker.node("teacher")
        data = _big_packet(tmp_path, teacher, "stall.topic")
        sock = _start_upload(broker.url, teacher.token, "stall.topic", data, send=len(data) * 2 // 3)
        refused = _read_response(sock)
        assert refused.status == 408, refused.body
        assert refused.json()["code"] == "upload_stalled"
        assert refused.headers["connection"] == "close"
        assert _closed_by_server(sock, time.monotonic() + DEADLINE)
        sock.close()

        assert len(broker.store.staged) == 1, "the upload should have been staged before it stalled"
        incoming = broker.data_dir / "blobs" / "incoming"
        _poll(lambda: not any(incoming.iterdir()), "the staged upload to be discarded")
        assert not (broker.data_dir / "blobs" / "packets").exists() or not any(
            (broker.data_dir / "blobs" / "packets").iterdir()
        )
        with broker.admin() as admin:
            assert admin.get(f"/v1/packets/{hashlib.sha256(data).hexdigest()}").status_code == 404
            assert admin.get("/v1/topics/stall.topic").status_code == 404  # created only with a first packet

        # The same packet, sent whole, is accepted: the refusal left nothing in its way.
        r = teacher.http.post("/v1/topics/stall.topic/packets", content=data)
        assert r.status_code == 201, r.text


def test_a_trickled_request_body_gets_408_body_stalled(tmp_path: Path) -> None:
    """A small (JSON) body must be complete in time: a byte now and then does not keep it going."""
    with embedded_broker(tmp_path, body_idle_timeout_seconds=1) as broker:
        sock = _connect(broker.url)
        sock.sendall(
            f"POST /v1/nodes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {broker.admin_token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode()
        )
        deadline = time.monotonic() + DEADLINE
        sock.settimeout(0.2)
        answer = b""
        while b"\r\n\r\n" not in answer and time.monotonic() < deadline:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(b" ")
            with contextlib.suppress(TimeoutError):
                answer += sock.recv(65536)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer[:300]
        sock.settimeout(10)
        while len(body) < int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0]):
            body += sock.recv(65536)
        assert json.loads(body)["code"] == "body_stalled"
        assert _closed_by_server(sock, time.monotonic() + DEADLINE)
        sock.close()


def test_one_node_gets_429_past_its_upload_cap_and_another_is_unaffected(tmp_path: Path) -> None:
    with embedded_broker(tmp_path, max_uploads_per_node=2, body_idle_timeout_seconds=300) as broker:
        uploads = broker.app.state.node_concurrency.uploads
        a, b = broker.node("teacher"), broker.node("teacher")
        pending = [
            _start_upload(broker.url, a.token, "cap.a", _big_packet(tmp_path, a, "cap.a", seed=i), send=1000)
            for i in range(2)
        ]
        _poll(lambda: sorted(uploads.held().values()) == [2], "node a's two uploads in progress")

        third = a.http.post("/v1/topics/cap.a/packets", content=_big_packet(tmp_path, a, "cap.a", seed=9))
        assert third.status_code == 429, third.text
        assert third.json()["code"] == "too_many_uploads"
        assert int(third.headers["retry-after"]) >= 1

        other = b.http.post("/v1/topics/cap.b/packets", content=_big_packet(tmp_path, b, "cap.b"))
        assert other.status_code == 201, other.text

        for sock in pending:
            sock.close()
        _poll(lambda: uploads.held() == {}, "the abandoned uploads to give their slots back")
        again = a.http.post("/v1/topics/cap.a/packets", content=_big_packet(tmp_path, a, "cap.a", seed=9))
        assert again.status_code == 201, again.text
        assert not any((broker.data_dir / "blobs" / "incoming").iterdir())


def test_one_node_gets_429_past_its_stream_cap_and_another_is_unaffected(tmp_path: Path) -> None:
    with embedded_broker(tmp_path, max_streams_per_node=2) as broker:
        streams = broker.app.state.node_concurrency.streams
        teacher = broker.node("teacher")
        data = packet_bytes(tmp_path, teacher.key, "streams.t")  # type: ignore[arg-type]
        assert teacher.http.post("/v1/topics/streams.t/packets", content=data).status_code == 201
        a, b = broker.node("student", with_key=False), broker.node("student", with_key=False)

        readers = []  # a dropped line iterator would close its connection (httpcore closes on GeneratorExit)
        with contextlib.ExitStack() as held:
            for _ in range(2):
                sse = held.enter_context(a.http.stream("GET", "/v1/topics/streams.t/events"))
                assert sse.status_code == 200
                readers.append(sse.iter_lines())
                assert next(readers[-1]) == ": connected"
            assert sorted(streams.held().values()) == [2]

            third = a.http.get("/v1/topics/streams.t/events")
            assert third.status_code == 429 and third.json()["code"] == "too_many_streams", third.text
            assert int(third.headers["retry-after"]) >= 1
            poll = a.http.get("/v1/topics/streams.t/packets", params={"after": 1, "wait": 5})
            assert poll.status_code == 429 and poll.json()["code"] == "too_many_streams", poll.text
            page = a.http.get("/v1/topics/streams.t/packets")  # no wait: not a stream
            assert page.status_code == 200 and len(page.json()["items"]) == 1

            with b.http.stream("GET", "/v1/topics/streams.t/events") as other:
                assert other.status_code == 200
                other_lines = other.iter_lines()
                assert next(other_lines) == ": connected"
                assert sorted(streams.held().values()) == [1, 2]
            other_poll = b.http.get("/v1/topics/streams.t/packets", params={"after": 0, "wait": 5})
            assert other_poll.status_code == 200 and len(other_poll.json()["items"]) == 1

            readers.clear()
        _poll(lambda: streams.held() == {}, "closed streams to give their slots back")
        with a.http.stream("GET", "/v1/topics/streams.t/events") as again:
            assert again.status_code == 200


def test_limits_have_bounds() -> None:
    from pydantic import ValidationError

    defaults = Settings(data_dir=Path("unused"))
    assert (defaults.header_timeout_seconds, defaults.body_idle_timeout_seconds) == (10.0, 30.0)
    assert (defaults.max_uploads_per_node, defaults.max_streams_per_node, defaults.max_connections) == (4, 8, 0)
    for bad in (
        {"max_uploads_per_node": 0},
        {"max_streams_per_node": 0},
        {"header_timeout_seconds": 0},
        {"body_idle_timeout_seconds": -1},
        {"keepalive_timeout_seconds": 0},
        {"max_connections": -1},
        {"header_timeout_seconds": 301},
    ):
        with pytest.raises(ValidationError):
            Settings(data_dir=Path("unused"), **bad)
    from m2kt.broker.server import connection_cap

    assert connection_cap(0, open_files=512) == 256
    assert connection_cap(0, open_files=1 << 20) == 1024
    assert connection_cap(0, open_files=20) == 16
    assert connection_cap(5000, open_files=1024) == 1024 - 128
    assert connection_cap(100, open_files=1024) == 100
