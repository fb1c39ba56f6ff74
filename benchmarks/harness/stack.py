"""The real stack the broker benchmarks run against: nanio (file-backed S3) on a free loopback
port, a throw-away PostgreSQL database, and ``m2kt broker serve`` as a separate process."""

from __future__ import annotations

import secrets
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from m2kt.benchmarks.harness.brokers import BrokerProcess, create_database, drop_database, s3_env
from m2kt.benchmarks.harness.services import S3Server
from m2kt.benchmarks.harness.services import start_nanio as start_test_nanio
from m2kt.broker.db import upgrade


def start_nanio(data_dir: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], S3Server]:
    """nanio on a free loopback port, with a random secret; its stderr goes to ``log_path``."""
    return start_test_nanio(data_dir, "m2kt-bench", "m2kt-bench-" + secrets.token_hex(8), log_path=log_path)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class BrokerStack:
    broker: BrokerProcess
    nanio_pid: int
    s3: S3Server
    s3c: Any  # a boto3 S3 client for the raw reference transfers
    bucket: str
    admin_token: str

    @property
    def broker_pid(self) -> int:
        assert self.broker.proc is not None
        return self.broker.proc.pid


@contextmanager
def broker_stack(
    tmp: Path,
    database_url: str,
    broker_log: Path,
    extra_env: dict[str, str] | None = None,
    *,
    workers: int = 1,
    code: Path | None = None,
) -> Iterator[BrokerStack]:
    """Start everything under ``tmp``; stop it and drop the database on the way out.

    ``extra_env``: more ``M2KT_*`` settings for the broker process (they override the stack's own);
    ``workers``: ``m2kt broker serve --workers``; ``code``: a directory holding another ``m2kt`` package
    (an older checkout, for before/after comparisons in one run) that the broker process imports instead
    of this one — it then migrates its database itself (``--migrate``), to its own schema."""
    nanio = broker = database = None
    try:
        (tmp / "s3").mkdir()
        nanio, s3 = start_nanio(tmp / "s3", tmp / "nanio.log")
        s3c = s3.client()
        bucket = f"m2kt-bench-{uuid.uuid4().hex[:10]}"
        s3c.create_bucket(Bucket=bucket)
        database = create_database(database_url)
        if code is None:
            upgrade(database)
        admin_token = "m2kt_bench_" + secrets.token_urlsafe(24)
        (tmp / "broker-data").mkdir()
        broker = BrokerProcess(
            env={
                "M2KT_DATABASE_URL": database,
                "M2KT_STORAGE_URL": f"s3://{bucket}",
                "M2KT_BOOTSTRAP_ADMIN_TOKEN": admin_token,
                "M2KT_DATA_DIR": str(tmp / "broker-data"),
                **s3_env(s3),
                **(extra_env or {}),
                **({"PYTHONPATH": str(code)} if code is not None else {}),
            },
            log_path=broker_log,
            workers=workers,
            extra_args=["--migrate"] if code is not None else [],
        ).start()
        ready = httpx.get(broker.url + "/readyz", timeout=30)
        if ready.status_code != 200:
            raise RuntimeError(f"/readyz answered {ready.status_code}: {ready.text}")
        yield BrokerStack(broker, nanio.pid, s3, s3c, bucket, admin_token)
    finally:
        if broker is not None:
            broker.stop()
        if nanio is not None:
            stop_process(nanio)
        if database is not None:
            drop_database(database)
