"""Real services for tests and benchmarks: PostgreSQL (already running) and an S3-protocol server (nanio).

In CI, ``.ci/run`` starts them and exports ``M2KT_TEST_DATABASE_URL`` and ``M2KT_TEST_S3_ENDPOINT`` (+ the
standard ``AWS_*`` credentials). Locally, Postgres is looked for on 127.0.0.1:5432 and nanio is started
when no endpoint is given.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def libpq_url(sqlalchemy_url: str) -> str:
    """``postgresql+psycopg://…`` → ``postgresql://…`` for psycopg.connect."""
    scheme, rest = sqlalchemy_url.split("://", 1)
    return "postgresql://" + rest


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def client(self):  # type: ignore[no-untyped-def]
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(signature_version="s3v4", retries={"max_attempts": 2}, connect_timeout=5, read_timeout=30),
        )


def start_nanio(
    data_dir: Path,
    access_key: str = "m2kt-test",
    secret_key: str = "m2kt-test-secret",
    port: int | None = None,
    log_path: Path | None = None,
) -> tuple[subprocess.Popen[bytes], S3Server]:
    """Start nanio (a file-backed S3 server) on a loopback port (a free one unless given).

    Its stderr goes to ``log_path`` or nowhere — never to a pipe nobody reads, which could fill up
    and block the server."""
    exe = shutil.which("nanio") or str(Path(sys.executable).with_name("nanio"))
    port = port or free_port()
    env = dict(os.environ, NANIO_ACCESS_KEY=access_key, NANIO_SECRET_KEY=secret_key)
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [
            exe,
            "serve",
            "--data-dir",
            str(data_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    if log_path:
        log.close()  # type: ignore[union-attr]
    try:
        wait_for_port(port, proc)
    except Exception:
        proc.kill()
        raise
    return proc, S3Server(f"http://127.0.0.1:{port}", access_key, secret_key)
