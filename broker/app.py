"""Broker application factory: settings → engine, storage, hub → routers, with a checked start-up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from m2kt import __version__
from m2kt.broker.concurrency import install_node_concurrency
from m2kt.broker.db import (
    check_schema,
    current_revision,
    make_engine,
    make_read_sessionmaker,
    make_sessionmaker,
    upgrade,
)
from m2kt.broker.docs import install_docs
from m2kt.broker.gc import collect_garbage
from m2kt.broker.guard import RequestGuard
from m2kt.broker.handlers import install_error_handlers
from m2kt.broker.metrics import Metrics
from m2kt.broker.pubsub import Hub, listen_postgres, wire_notifications
from m2kt.broker.ratelimit import UploadRateLimiter
from m2kt.broker.routes import admin, keys, maintenance, nodes, ops, packets, subscriptions, topics
from m2kt.broker.services.nodes import ensure_admin
from m2kt.broker.settings import Settings
from m2kt.broker.state import BrokerState
from m2kt.broker.storage import BlobStore, storage_from_url, with_inline_blobs, with_inline_blobs_found

log = logging.getLogger("m2kt.broker")

DESCRIPTION = """
The trusted place between teachers and students: signed knowledge packets in object storage,
provenance in a database.

**Authorise** with a node's API token (`m2kt_…`, from `POST /v1/nodes`). Scopes by role:
admin → `admin`; teacher → `read`, `keys`, `publish:*`; student → `read`, `receipt`, `keys`.

Errors are `{"code": "...", "message": "..."}` with a stable `code`: 400 malformed, 401/403
auth, 404, 409 conflict, 413 too large, 422 failed validation, 429 too many uploads (see `Retry-After`),
503 a dependency is down. Threat model and limits: SECURITY.md in the repository.
"""


def _bootstrap_admin(state: BrokerState) -> None:
    settings = state.settings
    token = settings.bootstrap_admin_token
    token_file = settings.data_dir / "admin-token"
    if token is None and settings.embedded:
        token = "m2kt_" + secrets.token_urlsafe(32)
        with state.sessions.begin() as session:
            created = ensure_admin(session, token)
        if created:
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
            log.warning("created the first admin; its token is in %s", token_file.resolve())
        return
    if token is not None:
        with state.sessions.begin() as session:
            if ensure_admin(session, token):
                log.warning("created the first admin from M2KT_BOOTSTRAP_ADMIN_TOKEN")


async def _gc_every(state: BrokerState, interval: float, stop: asyncio.Event) -> None:
    """Run garbage collection every ``interval`` seconds until ``stop``; a failed run is logged and retried."""
    while True:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        if stop.is_set():
            return
        try:
            await run_in_threadpool(collect_garbage, state.sessions, state.storage, state.settings.gc_grace_seconds)
        except Exception:  # storage or database down: try again next time
            log.exception("scheduled garbage collection failed")


def prepare_database(settings: Settings) -> None:
    """Refuse an out-of-date schema; the embedded default migrates its own brand-new database."""
    if settings.embedded:
        _private_data_dir(settings)
    engine = make_engine(settings.effective_database_url)
    try:
        if settings.embedded and current_revision(engine) is None:
            upgrade(settings.effective_database_url)
        check_schema(engine)
    finally:
        engine.dispose()


class RequestMetrics:
    """Counts requests by method, route template and status — as plain ASGI, so a streamed upload's
    ~2,000 body messages pass straight through (a BaseHTTPMiddleware wraps each one in a task group)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_note(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope["method"], path, str(status)).inc()


def make_storage(settings: Settings) -> BlobStore:
    """The blob store the settings name (S3 or a local directory)."""
    return storage_from_url(
        settings.effective_storage_url,
        endpoint_url=settings.s3_endpoint_url,
        part_size=settings.upload_part_bytes,
        public_endpoint_url=settings.s3_public_endpoint_url,
    )


def _private_data_dir(settings: Settings) -> None:
    """The embedded default's files are the broker's alone: the database (and its WAL, which SQLite creates
    with the database's mode) 0600, the blob directory 0700 — token hashes, the audit log and every packet
    are not for other local users. The data directory itself is left as it is, when it already exists."""
    data = Path(settings.data_dir)
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    database = data / "m2kt.db"
    os.close(os.open(database, os.O_WRONLY | os.O_CREAT, 0o600))
    os.chmod(database, 0o600)
    if settings.storage_url is None:
        blobs = Path(settings.effective_storage_url)
        blobs.mkdir(mode=0o700, exist_ok=True)
        os.chmod(blobs, 0o700)


def create_app(settings: Settings | None = None, *, storage: BlobStore | None = None) -> FastAPI:
    """Build the broker. Nothing connects until start-up, which checks the schema first."""
    settings = settings or Settings()
    if settings.embedded:
        _private_data_dir(settings)
    engine = make_engine(settings.effective_database_url)
    state = BrokerState(
        settings=settings,
        engine=engine,
        sessions=make_sessionmaker(engine),
        reads=make_read_sessionmaker(engine),
        storage=with_inline_blobs(storage or make_storage(settings), engine, settings.inline_blob_max_bytes),
        hub=Hub(),
        metrics=Metrics(),
        uploads=UploadRateLimiter(settings.upload_rate_per_minute, settings.upload_burst),
        upload_threads=anyio.CapacityLimiter(settings.upload_threads),
    )
    wire_notifications(state.sessions, state.hub)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        prepare_database(settings)
        state.storage = with_inline_blobs_found(state.storage, engine, settings.inline_blob_max_bytes)
        _bootstrap_admin(state)
        state.hub.bind(asyncio.get_running_loop())
        stop = asyncio.Event()
        listener = (
            asyncio.create_task(listen_postgres(settings.effective_database_url, state.hub, stop))
            if settings.is_postgres
            else None
        )
        collector = (
            asyncio.create_task(_gc_every(state, settings.gc_interval_seconds, stop))
            if settings.gc_interval_seconds
            else None
        )
        log.info(
            "broker ready: database %s, storage %s",
            engine.url.render_as_string(hide_password=True),
            state.storage.description,
        )
        try:
            yield
        finally:
            stop.set()
            if collector is not None:
                with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError, Exception):
                    await asyncio.wait_for(collector, 10)
            if listener is not None:  # it notices `stop` within half a second
                with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError, Exception):
                    await asyncio.wait_for(listener, 3)
            engine.dispose()

    app = FastAPI(
        title="M2KT broker",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # broker.docs serves /docs and /redoc without a CDN
        redoc_url=None,
    )
    app.state.broker = state
    install_node_concurrency(app, settings)
    install_error_handlers(app)
    install_docs(app)
    for module in (ops, nodes, keys, topics, packets, subscriptions, admin, maintenance):
        app.include_router(module.router)

    app.add_middleware(
        RequestGuard,
        max_body_bytes=settings.max_json_body_bytes,
        body_idle_timeout=settings.body_idle_timeout_seconds,
    )
    app.add_middleware(RequestMetrics, metrics=state.metrics)
    return app
