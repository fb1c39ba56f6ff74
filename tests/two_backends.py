"""Brokers on both backends for tests that must hold on each: uvicorn on a loopback socket over Postgres +
an S3 server (nanio), and over the embedded default (SQLite + a blob directory)."""

from __future__ import annotations

import hashlib
import os
import struct
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from m2kt.benchmarks.harness.brokers import BrokerProcess, Node, register_node, unique, uvicorn_thread
from m2kt.benchmarks.harness.services import S3Server
from m2kt.broker.app import create_app
from m2kt.broker.services.upload import blob_key
from m2kt.broker.settings import Settings
from tests.conftest import LiveBroker, start_live_broker

BACKENDS = ["postgres", "embedded"]


@dataclass
class Broker:
    url: str
    admin_token: str
    state: Any  # m2kt.broker.state.BrokerState

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.admin_token}"}, timeout=60)

    def node(self, role: str, **kw: Any) -> Node:
        return register_node(self.url, self.admin_token, role, **kw)

    def blob_exists(self, data: bytes) -> bool:
        (n,) = struct.unpack("<Q", data[:8])
        key = blob_key(hashlib.sha256(data[8 + n :]).hexdigest(), hashlib.sha256(data[: 8 + n]).hexdigest())
        return bool(self.state.storage.exists(key))

    def staged_nothing(self) -> bool:
        """No staged upload is left (S3: no unfinished multipart upload; local: nothing in incoming/)."""
        return not list(self.state.storage.unfinished_uploads())


@pytest.fixture
def start_broker(
    tmp_path: Path, live_broker: LiveBroker, s3_server: S3Server, s3_bucket: str
) -> Iterator[Callable[..., Broker]]:
    """``start_broker(backend, **settings)``: a broker on ``backend`` with these settings, stopped at the end.
    Postgres brokers share the session's database (and its admin) and this test's fresh bucket;
    ``embedded-process`` is ``m2kt broker serve`` with nothing configured, in a process of its own
    (its ``state`` is None)."""
    servers = []
    processes: list[BrokerProcess] = []

    def start(backend: str, **settings: Any) -> Broker:
        if backend == "postgres":
            database = live_broker.state.settings.database_url  # type: ignore[attr-defined]
            token, app, server = start_live_broker(
                database, s3_server, s3_bucket, tmp_path / unique("pg"), token=live_broker.admin_token, **settings
            )
        elif backend == "embedded-process":  # `m2kt broker serve` itself: its own process, its own threads
            cwd = tmp_path / unique("process")
            cwd.mkdir()
            env = {k: "" for k in os.environ if k.startswith("M2KT_") and not k.startswith("M2KT_TEST_")}
            env |= {f"M2KT_{k.upper()}": str(v) for k, v in settings.items()}
            process = BrokerProcess(env, cwd=cwd, log_path=cwd / "broker.log").start()
            processes.append(process)
            return Broker(process.url, (cwd / "m2kt-data" / "admin-token").read_text().strip(), None)
        else:
            token = "m2kt_admin_" + uuid.uuid4().hex
            config = Settings(
                data_dir=tmp_path / unique("embedded"),
                bootstrap_admin_token=token,
                poll_fallback_seconds=2.0,
                **settings,
            )
            app = create_app(config)
            server = uvicorn_thread(app)
        url = server.__enter__()
        servers.append(server)
        return Broker(url, token, app.state.broker)

    yield start
    for server in reversed(servers):
        server.__exit__(None, None, None)
    for process in processes:
        process.stop()


def upload(node: Node, topic: str, data: bytes | Iterator[bytes]) -> httpx.Response:
    """POST a packet (bytes, or an iterator of chunks) as ``node``."""
    return node.http.post(f"/v1/topics/{topic}/packets", content=data, timeout=120)


def refusal(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json().get("code", "")
