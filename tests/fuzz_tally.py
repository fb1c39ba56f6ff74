"""Counting for the fuzz suites: requests sent, statuses seen, 5xx, failures, and crashes.

A *crash* is an unhandled exception the in-process server logged (uvicorn's "Exception in ASGI
application", or any ERROR record with a traceback from the broker's loggers), or the broker no
longer answering ``/healthz`` after the run.

The summary is printed as one line (visible with ``pytest -s``) and written as JSON: into the file
``$M2KT_FUZZ_REPORT`` when set (one key per test, merged with what is there), else next to the
test's ``tmp_path``.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from hypothesis import HealthCheck, Verbosity, settings

from m2kt.benchmarks.harness.services import S3Server
from tests.conftest import LiveBroker, start_live_broker

# Loggers whose ERROR records mean the server hit something it did not handle. "uvicorn" does not
# propagate to the root logger, so it is watched directly.
WATCHED_LOGGERS = ("", "uvicorn", "uvicorn.error", "m2kt", "broker", "fastapi", "starlette")
MAX_EXAMPLES_KEPT = 20  # failure descriptions kept in the report


class _ErrorRecords(logging.Handler):
    """Collects ERROR-and-above records, each once however many watched loggers it passes."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self._seen: set[int] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if id(record) not in self._seen:
            self._seen.add(id(record))
            self.records.append(record)


@dataclass
class Tally:
    """What one fuzz test sent and got back."""

    name: str
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    by_operation: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    failure_count: int = 0
    errors_logged: list[str] = field(default_factory=list)
    healthy_after: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self, status: int, operation: str = "") -> None:
        self.requests += 1
        self.statuses[status] += 1
        if operation:
            self.by_operation[operation] += 1

    def fail(self, description: str) -> None:
        self.failure_count += 1
        if len(self.failures) < MAX_EXAMPLES_KEPT:
            self.failures.append(description[:2000])

    @property
    def server_errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500)

    @property
    def crashes(self) -> int:
        """Unhandled exceptions the server logged, plus one when it stopped answering /healthz."""
        return len(self.errors_logged) + (self.healthy_after is False)

    def classes(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for status, n in self.statuses.items():
            out[f"{status // 100}xx"] += n
        return dict(sorted(out.items()))

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "status_classes": self.classes(),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "server_errors": self.server_errors,
            "crashes": self.crashes,
            "healthy_after": self.healthy_after,
            "failures": self.failure_count,
            "failure_examples": self.failures,
            "errors_logged": self.errors_logged[:MAX_EXAMPLES_KEPT],
            "by_operation": dict(sorted(self.by_operation.items())),
            **self.extra,
        }

    def line(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.extra.items() if isinstance(v, int | float | str))
        return (
            f"FUZZ {self.name}: requests={self.requests} classes={self.classes()} 5xx={self.server_errors} "
            f"crashes={self.crashes} failures={self.failure_count} {extra}"
        ).rstrip()

    def check_health(self, base_url: str) -> None:
        try:
            self.healthy_after = httpx.get(f"{base_url}/healthz", timeout=10).status_code == 200
        except httpx.HTTPError:
            self.healthy_after = False

    def report(self, tmp_path: Path) -> Path:
        """Print the one-line summary and write the JSON report; returns where it went."""
        print(f"\n{self.line()}")
        target = os.environ.get("M2KT_FUZZ_REPORT")
        path = Path(target) if target else tmp_path / "fuzz-report.json"
        existing: dict[str, Any] = {}
        if path.exists():
            try:
                existing = json.loads(path.read_text())
            except ValueError:
                existing = {}
        existing[self.name] = self.as_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(existing, indent=2, sort_keys=True))
        return path


@contextmanager
def own_broker(postgres_url: str, s3_server: S3Server, tmp: Path, **settings: object) -> Iterator[LiveBroker]:
    """A broker of its own (fresh database, fresh bucket) on uvicorn at 127.0.0.1, for fuzzing.

    Its own state, so fuzzed admin calls (revoking tokens and keys, creating nodes) cannot disturb
    other tests, and so "nothing was stored" can be checked exactly. Uploads are not rate-limited,
    so every fuzzed packet reaches the parser."""
    from m2kt.benchmarks.harness.brokers import create_database, drop_database
    from m2kt.broker.db import upgrade

    database = create_database(postgres_url)
    bucket = f"m2kt-fuzz-{uuid.uuid4().hex[:10]}"
    client = s3_server.client()
    client.create_bucket(Bucket=bucket)
    try:
        upgrade(database)
        settings = {"upload_rate_per_minute": 0, **settings}
        token, app, server = start_live_broker(database, s3_server, bucket, tmp, **settings)
        with server as url:
            yield LiveBroker(url, token, app.state.broker, bucket)
    finally:
        drop_database(database)
        _remove_bucket(client, bucket)


def _remove_bucket(client: Any, bucket: str) -> None:
    for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=obj["Key"])
    client.delete_bucket(Bucket=bucket)


@contextmanager
def watch_server_errors(tally: Tally) -> Iterator[None]:
    """Record every ERROR log record from the server's loggers while the block runs."""
    handler = _ErrorRecords()
    loggers = [logging.getLogger(name) for name in WATCHED_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        for record in handler.records:
            where = f"{record.name}: {record.getMessage()[:300]}"
            if record.exc_info and record.exc_info[1] is not None:
                where += f" [{type(record.exc_info[1]).__name__}: {str(record.exc_info[1])[:300]}]"
            tally.errors_logged.append(where)


def fuzz_examples(default: int) -> int:
    """Examples per operation / per packet family: ``$M2KT_FUZZ_EXAMPLES`` or the CI default."""
    value = os.environ.get("M2KT_FUZZ_EXAMPLES", "").strip()
    return int(value) if value else default


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def hypothesis_settings(max_examples: int, **extra: Any) -> settings:
    """Fixed budget, no deadline, derandomized in CI; failures are tallied and asserted on at the end."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=in_ci(),
        database=None if in_ci() else settings.default.database,
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        **extra,
    )
