"""Running real brokers for tests: in a thread (uvicorn on a loopback socket) or as a process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from m2kt.benchmarks.harness.services import S3Server, free_port, libpq_url, wait_for_port
from m2kt.format.key_proof import prove_key
from m2kt.format.keys import SigningKey
from m2kt.sdk import calls


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@contextmanager
def uvicorn_thread(app, *, http: str = "auto") -> Iterator[str]:  # type: ignore[no-untyped-def]
    """Serve ``app`` on a free loopback port from a background thread; yields the base URL.

    Served as ``m2kt broker serve`` serves it (:func:`m2kt.broker.server.server_config`): connections
    capped and timed by the app's settings, secrets redacted from the logs. ``http``: "auto",
    "httptools" or "h11" (uvicorn's protocol implementation)."""
    from m2kt.broker.server import server_config

    port = free_port()
    config = server_config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        http=http,  # type: ignore[arg-type]
        lifespan="on",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        if thread.is_alive():  # pragma: no cover - debugging aid
            import traceback

            frame = sys._current_frames().get(thread.ident)  # type: ignore[arg-type]
            print("".join(traceback.format_stack(frame)) if frame else "no frame", file=sys.stderr)


def s3_broker_app(
    database_url: str,
    s3: S3Server,
    bucket: str,
    data_dir: Path,
    token: str,
    *,
    part_size: int = 8 << 20,
    **settings: Any,
) -> Any:
    """A broker app (not yet served) on ``database_url`` and the S3 bucket ``bucket`` of ``s3``, its first
    admin bootstrapped with ``token``; ``settings`` override the broker's defaults."""
    from m2kt.broker.app import create_app
    from m2kt.broker.settings import Settings
    from m2kt.broker.storage import S3Store

    config = Settings(
        database_url=database_url,
        storage_url=f"s3://{bucket}",
        data_dir=data_dir,
        bootstrap_admin_token=token,
        **settings,
    )
    return create_app(config, storage=S3Store(s3.client(), bucket, part_size=part_size))


def create_database(server_url: str) -> str:
    """A new, empty database on the same server; returns its SQLAlchemy URL."""
    import psycopg

    name = f"m2kt_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(libpq_url(server_url), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + "/" + name


def drop_database(url: str) -> None:
    import psycopg

    base, name = url.rsplit("/", 1)
    with psycopg.connect(libpq_url(base + "/postgres"), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def s3_env(s3: S3Server) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        "AWS_DEFAULT_REGION": s3.region,
        "AWS_ENDPOINT_URL": s3.endpoint,
    }


@dataclass
class BrokerProcess:
    """``m2kt broker serve`` as a real process (for SIGKILL and multi-replica tests)."""

    env: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    cwd: Path | None = None
    log_level: str = "warning"
    max_open_files: int | None = None  # the process's RLIMIT_NOFILE (ulimit -n), when given
    workers: int = 1  # m2kt broker serve --workers
    extra_args: list[str] = field(default_factory=list)  # more m2kt broker serve options

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> BrokerProcess:
        exe = str(Path(sys.executable).with_name("m2kt"))
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        argv = [exe, "broker", "serve", "--port", str(self.port), "--log-level", self.log_level]
        if self.workers != 1:
            argv += ["--workers", str(self.workers)]
        argv += self.extra_args
        if self.max_open_files:  # the shell sets the limit, then becomes the broker (same pid)
            argv = ["/bin/sh", "-c", f'ulimit -S -n {int(self.max_open_files)} && exec "$0" "$@"', *argv]
        self.proc = subprocess.Popen(
            argv,
            env={**os.environ, **self.env},
            stdout=log,
            stderr=log,
            cwd=self.cwd,
        )
        wait_for_port(self.port, self.proc, timeout=30)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Node:
    name: str
    token: str
    http: httpx.Client
    key: SigningKey | None = None


def register_node(
    base_url: str, admin_token: str, role: str, *, scopes: list[str] | None = None, with_key: bool = True
) -> Node:
    admin = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=30)
    name = unique(role)
    body: dict[str, object] = {"name": name, "role": role}
    if scopes is not None:
        body["scopes"] = scopes
    r = admin.post("/v1/nodes", json=body)
    assert r.status_code == 201, r.text
    token = r.json()["token"]["token"]
    node = Node(name, token, httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=60))
    if with_key:
        node.key = SigningKey.generate()
        r = node.http.post("/v1/keys", json=calls.register_key(prove_key(node.key, name)).json)
        assert r.status_code == 201, r.text
    return node
