"""Serving the broker with uvicorn: a cap on open connections and a deadline for each request head.

uvicorn (0.55, both its httptools and h11 protocols) arms no timer on a new connection — one that never
sends a byte, or sends its request head a byte at a time, stays open for good — and its
``limit_concurrency`` answers 503 to *requests*: idle connections still hold a file descriptor each,
until the process can accept no more and legitimate clients wait in the listen backlog. The protocol
classes here add, per broker process:

* a cap on open connections (``M2KT_MAX_CONNECTIONS``; 0: half the open-file limit, at most 1024).
  At the cap, a new connection closes the oldest one that is *waiting for a request head* (never
  sent one, or idle between keep-alive requests); when every connection is busy with a request, the
  new one is answered ``503 too_many_connections`` and closed. Strangers holding idle connections
  therefore never keep a legitimate request out, and never exhaust the process's descriptors;
* a request-head deadline (``M2KT_HEADER_TIMEOUT_SECONDS``): a connection that has not sent a complete
  request line and headers within that many seconds of opening, or of its previous response, is
  closed — whether it sent nothing or a byte at a time;
* a stalled reader: a response whose client reads nothing for ``M2KT_BODY_IDLE_TIMEOUT_SECONDS`` while
  the server has more to send (the transport's write buffer stays full) is dropped and the connection
  closed — otherwise a stranger fetching a large unauthenticated asset (the docs' bundle) and never
  reading it keeps a busy connection, and the buffered response, for good;
* the keep-alive idle timeout (``M2KT_KEEPALIVE_TIMEOUT_SECONDS``) is uvicorn's own ``timeout_keep_alive``.

:func:`server_config` builds the ``uvicorn.Config`` (used by ``m2kt broker serve`` and the test
harness's ``uvicorn_thread``); stalled request *bodies* are the app's business (:mod:`m2kt.broker.stalls`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from typing import Any, ClassVar, Literal

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from m2kt.broker.logredact import install_redaction, logging_config
from m2kt.broker.settings import Settings

__all__ = [
    "ConnectionLimits",
    "connection_cap",
    "guarded_protocol",
    "serve",
    "server_config",
]

log = logging.getLogger("m2kt.broker.server")

#: Automatic cap: this share of the open-file limit, within these bounds.
AUTO_SHARE, AUTO_MIN, AUTO_MAX = 0.5, 16, 1024
#: Descriptors an explicit cap leaves to the broker itself (database pool, storage, staged files).
FD_RESERVE = 128
#: At most one summary log line per this many seconds while connections are being cut.
REPORT_EVERY = 10.0

HttpKind = Literal["auto", "httptools", "h11"]


def _open_file_limit() -> int | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def connection_cap(requested: int, open_files: int | None = None) -> int:
    """The connection cap to enforce: ``requested``, or (0) half the open-file limit within
    [16, 1024]; an explicit cap the descriptor limit cannot hold is lowered, with a warning."""
    limit = _open_file_limit() if open_files is None else open_files
    if requested == 0:
        if limit is None:
            return AUTO_MAX
        return max(AUTO_MIN, min(AUTO_MAX, int(limit * AUTO_SHARE)))
    if limit is not None and requested > max(AUTO_MIN, limit - FD_RESERVE):
        lowered = max(AUTO_MIN, limit - FD_RESERVE)
        log.warning(
            "M2KT_MAX_CONNECTIONS=%d does not fit the open-file limit (ulimit -n %d): using %d",
            requested,
            limit,
            lowered,
        )
        return lowered
    return requested


def _raw_response(status: int, reason: str, code: str, message: str, extra: bytes = b"") -> bytes:
    body = json.dumps({"code": code, "message": message}).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\n".encode()
        + b"content-type: application/json\r\n"
        + f"content-length: {len(body)}\r\n".encode()
        + b"connection: close\r\n"
        + extra
        + b"\r\n"
        + body
    )


class ConnectionLimits:
    """What one server's connections share: the open set (oldest first), the cap, the head deadline."""

    def __init__(self, max_connections: int, header_timeout: float, send_timeout: float = 30.0) -> None:
        if max_connections < 1 or header_timeout <= 0 or send_timeout <= 0:
            raise ValueError("max_connections must be at least 1, the timeouts above 0")
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.send_timeout = send_timeout
        self._open: dict[Any, None] = {}  # insertion order: oldest first
        self.evicted = self.refused = self.timed_out = self.send_stalled = 0  # totals, for tests and reports
        self._unreported = {"evicted": 0, "refused": 0, "timed_out": 0, "send_stalled": 0}
        self._last_report = float("-inf")
        self.refusal = _raw_response(
            503,
            "Service Unavailable",
            "too_many_connections",
            f"the broker holds its limit of {max_connections} open connections (M2KT_MAX_CONNECTIONS) "
            "and every one is busy; retry shortly",
            b"retry-after: 1\r\n",
        )

    @property
    def open_count(self) -> int:
        return len(self._open)

    @property
    def busy_count(self) -> int:
        """Open connections with a request in progress (not waiting for a request head)."""
        return sum(1 for c in self._open if not c.m2kt_awaiting_head)

    def admit(self, conn: Any) -> bool:
        """Count ``conn`` in, closing the oldest connection that waits for a request head if at the
        cap; False (the caller refuses it) when every open connection is busy."""
        if len(self._open) >= self.max_connections:
            victim = next((c for c in self._open if c.m2kt_awaiting_head), None)
            if victim is None:
                self.refused += 1
                self._note("refused")
                return False
            self._open.pop(victim, None)
            victim.m2kt_close("evicted")
            self.evicted += 1
            self._note("evicted")
        self._open[conn] = None
        return True

    def release(self, conn: Any) -> None:
        self._open.pop(conn, None)

    def head_timed_out(self) -> None:
        self.timed_out += 1
        self._note("timed_out")

    def reader_stalled(self) -> None:
        self.send_stalled += 1
        self._note("send_stalled")

    def _note(self, what: str) -> None:
        self._unreported[what] += 1
        now = time.monotonic()
        if now - self._last_report < REPORT_EVERY:
            return
        self._last_report = now
        counts, self._unreported = self._unreported, {k: 0 for k in self._unreported}
        log.warning(
            "connections cut since the last report: %d idle ones closed at the cap of %d (M2KT_MAX_CONNECTIONS), "
            "%d refused with 503 (every connection busy), %d closed for sending no complete request head "
            "within %g s (M2KT_HEADER_TIMEOUT_SECONDS), %d dropped for reading none of a response for %g s "
            "(M2KT_BODY_IDLE_TIMEOUT_SECONDS)",
            counts["evicted"],
            self.max_connections,
            counts["refused"],
            counts["timed_out"],
            self.header_timeout,
            counts["send_stalled"],
            self.send_timeout,
        )


class _GuardedConnection:
    """Mixed in before a uvicorn HTTP protocol: counts the connection in, and times its request heads."""

    limits: ClassVar[ConnectionLimits]
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop

    m2kt_awaiting_head = False
    m2kt_head_timer: asyncio.TimerHandle | None = None
    m2kt_send_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        if not self.limits.admit(self):
            transport.write(self.limits.refusal)
            transport.close()
            return
        self.m2kt_await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self.m2kt_head_received()
        self._m2kt_cancel_send_timer()
        self.limits.release(self)
        super().connection_lost(exc)  # type: ignore[misc]

    def pause_writing(self) -> None:
        """The transport's write buffer is full: the client is not reading. Start the stall clock."""
        super().pause_writing()  # type: ignore[misc]
        if self.m2kt_send_timer is None:
            self.m2kt_send_timer = self.loop.call_later(self.limits.send_timeout, self._m2kt_send_deadline)

    def resume_writing(self) -> None:
        self._m2kt_cancel_send_timer()
        super().resume_writing()  # type: ignore[misc]

    def _m2kt_cancel_send_timer(self) -> None:
        if self.m2kt_send_timer is not None:
            self.m2kt_send_timer.cancel()
            self.m2kt_send_timer = None

    def _m2kt_send_deadline(self) -> None:
        self.m2kt_send_timer = None
        if not self.transport.is_closing():
            self.limits.reader_stalled()
            self.transport.abort()  # drops what is buffered; the app's next send sees a disconnect

    def m2kt_await_head(self) -> None:
        """Start the request-head deadline (a new connection, or a response just completed)."""
        self.m2kt_head_received()
        if self.transport.is_closing():
            return
        self.m2kt_awaiting_head = True
        self.m2kt_head_timer = self.loop.call_later(self.limits.header_timeout, self._m2kt_head_deadline)

    def m2kt_head_received(self) -> None:
        self.m2kt_awaiting_head = False
        if self.m2kt_head_timer is not None:
            self.m2kt_head_timer.cancel()
            self.m2kt_head_timer = None

    def _m2kt_head_deadline(self) -> None:
        self.m2kt_head_timer = None
        if self.m2kt_awaiting_head and not self.transport.is_closing():
            self.limits.head_timed_out()
            self.m2kt_close("no request head in time")

    def m2kt_close(self, why: str) -> None:
        """Close a connection that is waiting for a request head (no response is in progress)."""
        self.m2kt_head_received()
        if not self.transport.is_closing():
            self.transport.close()


def _httptools_base() -> type | None:
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools is not installed
        return None
    return HttpToolsProtocol


class _GuardedH11(_GuardedConnection, H11Protocol):
    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # h11 parsed a new request's head (a new cycle)
            self.m2kt_head_received()

    def on_response_complete(self) -> None:
        # Armed first: uvicorn may start a pipelined request (parsing its head) before it returns.
        self.m2kt_await_head()
        super().on_response_complete()
        if self.transport.is_closing():
            self.m2kt_head_received()


def _guarded_httptools(base: type) -> type:
    class _GuardedHttpTools(_GuardedConnection, base):  # type: ignore[misc, valid-type]
        def on_headers_complete(self) -> None:
            self.m2kt_head_received()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            pipelined = bool(self.pipeline)  # a queued request whose head has arrived already
            super().on_response_complete()
            if not pipelined and not self.transport.is_closing():
                self.m2kt_await_head()

    return _GuardedHttpTools


def guarded_protocol(limits: ConnectionLimits, http: HttpKind = "auto") -> type:
    """A uvicorn HTTP protocol class (httptools when installed, unless ``http="h11"``) bound to ``limits``."""
    base = _httptools_base() if http in ("auto", "httptools") else None
    if http == "httptools" and base is None:
        raise RuntimeError("httptools is not installed")
    guarded = _guarded_httptools(base) if base is not None else _GuardedH11
    return type(f"M2kt{guarded.__name__.lstrip('_')}", (guarded,), {"limits": limits})


def _settings_of(app: Any) -> Settings:
    state = getattr(getattr(app, "state", None), "broker", None)
    settings = getattr(state, "settings", None)
    return settings if isinstance(settings, Settings) else Settings()


def server_config(
    app: Any,
    settings: Settings | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    http: HttpKind = "auto",
    **options: Any,
) -> uvicorn.Config:
    """The ``uvicorn.Config`` the broker is served with: guarded connections (see the module's
    docstring), no WebSocket upgrades (the API has none), and secrets redacted from the logs.

    ``options`` go to ``uvicorn.Config`` (``log_config``, ``timeout_graceful_shutdown`` …)."""
    settings = settings or _settings_of(app)
    limits = ConnectionLimits(
        connection_cap(settings.max_connections),
        settings.header_timeout_seconds,
        send_timeout=settings.body_idle_timeout_seconds,
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=guarded_protocol(limits, http),  # type: ignore[arg-type]
        ws="none",
        timeout_keep_alive=settings.keepalive_timeout_seconds,  # type: ignore[arg-type]  # a float works
        **options,
    )
    install_redaction()  # after Config: its __init__ (re)configures logging
    state = getattr(app, "state", None)
    if state is not None:
        state.connection_limits = limits  # for operators' and tests' eyes
    return config


def serve(
    app: Any, settings: Settings, *, host: str, port: int, log_level: str = "info", sock: socket.socket | None = None
) -> bool:
    """Run the broker until it is told to stop; False when it could not start. ``sock``: serve this
    already-bound listening socket (a worker of :mod:`m2kt.broker.workers`) instead of binding one."""
    config = server_config(
        app,
        settings,
        host=host,
        port=port,
        log_level=log_level,
        log_config=logging_config(log_level),
        timeout_graceful_shutdown=5,
    )
    log.info(
        "connections: at most %d open, request heads within %g s, keep-alive idle %g s, request bodies idle %g s",
        config.http.limits.max_connections,  # type: ignore[union-attr]
        settings.header_timeout_seconds,
        settings.keepalive_timeout_seconds,
        settings.body_idle_timeout_seconds,
    )
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock] if sock is not None else None)
    except KeyboardInterrupt:  # pragma: no cover - as uvicorn.run
        pass
    return server.started
