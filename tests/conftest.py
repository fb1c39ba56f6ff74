from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest

from client.keys import SigningKey
from client.manifest import (
    ConceptEntry,
    DataUsage,
    ExtractionInfo,
    ExtractionStep,
    ManifestBody,
    SafetyInfo,
    TeacherInfo,
)
from tests.services import DEFAULT_DATABASE_URL, S3Server, libpq_url, start_nanio, unavailable


@pytest.fixture(scope="session")
def signing_key() -> SigningKey:
    return SigningKey.from_seed(bytes(range(32)))


@pytest.fixture(scope="session")
def other_key() -> SigningKey:
    return SigningKey.from_seed(bytes(range(1, 33)))


def make_body(k: int = 4, d: int = 8, topic: str = "arith.mod97", **overrides: object) -> ManifestBody:
    fields: dict[str, object] = dict(
        topic=topic,
        teacher=TeacherInfo(
            model_name="tiny-transformer", architecture=f"TinyTransformer(d={d})", d_model=d, layers=["blocks.1"]
        ),
        concepts=[
            ConceptEntry(id=f"op:{i}", label=f"concept {i} — ü", kind="named", safety_score=0.01 * i) for i in range(k)
        ],
        extraction=ExtractionInfo(
            concepts=ExtractionStep(method="named_probes", params={"layer": "blocks.1", "position": -1}),
            traces=ExtractionStep(method="layer_states", params={"steps": 3}),
        ),
        data_usage=DataUsage(probe_count=16, teacher_forward_passes=2),
        created_at=datetime(2026, 11, 22, 12, 0, 0, 123456, tzinfo=UTC),
        safety=SafetyInfo(scorer="flagged-cosine", version="1", threshold=0.8),
    )
    fields.update(overrides)
    return ManifestBody(**fields)  # type: ignore[arg-type]


def make_tensors(k: int = 4, d: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "concepts": rng.standard_normal((k, d)).astype(np.float32),
        "traces": rng.standard_normal((3, 3, d)).astype(np.float16),
        "probe_tokens": rng.integers(0, 97, (3, 5)).astype(np.int64),
    }


@pytest.fixture
def body_factory() -> Callable[..., ManifestBody]:
    return make_body


@pytest.fixture(scope="session")
def postgres_url() -> str:
    url = os.environ.get("M2KT_TEST_DATABASE_URL", DEFAULT_DATABASE_URL)
    try:
        import psycopg

        with psycopg.connect(libpq_url(url), connect_timeout=3) as conn:
            conn.execute("select 1")
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        unavailable(f"PostgreSQL not reachable at {url}: {exc}")
    return url


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    endpoint = os.environ.get("M2KT_TEST_S3_ENDPOINT")
    if endpoint:
        yield S3Server(
            endpoint,
            os.environ.get("AWS_ACCESS_KEY_ID", ""),
            os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
            os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        )
        return
    if shutil.which("nanio") is None and not (Path(sys.executable).with_name("nanio")).exists():
        unavailable("no S3 server: set M2KT_TEST_S3_ENDPOINT or install nanio (pip install -e '.[test]')")
    proc, server = start_nanio(tmp_path_factory.mktemp("s3"))
    yield server
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh, empty bucket, removed afterwards."""
    client = s3_server.client()
    name = f"m2kt-test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    yield name
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=obj["Key"])
    client.delete_bucket(Bucket=name)


# ----------------------------------------------------------------------------- broker fixtures


@dataclass
class LiveBroker:
    url: str
    admin_token: str
    state: object  # broker.deps.BrokerState
    bucket: str

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.admin_token}"}, timeout=60)


@pytest.fixture(scope="session")
def broker_database(postgres_url: str) -> Iterator[str]:
    """A fresh Postgres database for this test session, migrated to head."""
    from broker.db import upgrade
    from tests.broker_harness import create_database, drop_database

    url = create_database(postgres_url)
    upgrade(url)
    yield url
    drop_database(url)


@pytest.fixture(scope="session")
def broker_bucket(s3_server: S3Server) -> str:
    name = f"m2kt-broker-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


def start_live_broker(
    database_url: str,
    s3_server: S3Server,
    bucket: str,
    tmp: Path,
    *,  # type: ignore[no-untyped-def]
    token: str | None = None,
    **settings: object,
):
    """A broker app on Postgres + S3, served by uvicorn on a loopback socket in this process.

    ``token`` bootstraps the first admin; pass the existing admin's token when the database has one."""
    from broker.app import create_app
    from broker.settings import Settings
    from broker.storage import S3Store
    from tests.broker_harness import uvicorn_thread

    token = token or "m2kt_admin_" + uuid.uuid4().hex
    config = Settings(
        database_url=database_url,
        storage_url=f"s3://{bucket}",
        data_dir=tmp,
        bootstrap_admin_token=token,
        poll_fallback_seconds=2.0,
        **settings,
    )
    app = create_app(config, storage=S3Store(s3_server.client(), bucket, part_size=5 << 20))
    return token, app, uvicorn_thread(app)


@pytest.fixture(scope="session")
def live_broker(
    broker_database: str, s3_server: S3Server, broker_bucket: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveBroker]:
    token, app, server = start_live_broker(broker_database, s3_server, broker_bucket, tmp_path_factory.mktemp("broker"))
    with server as url:
        yield LiveBroker(url, token, app.state.broker, broker_bucket)
