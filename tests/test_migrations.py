"""Alembic is the only way the schema changes: up from empty, down to base, up again — on
Postgres and SQLite — and a broker refuses to start on an out-of-date schema."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect

from m2kt.benchmarks.harness.brokers import create_database, drop_database
from m2kt.broker.db import (
    SchemaOutOfDate,
    check_schema,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    upgrade,
)
from m2kt.broker.models import Base

TABLES = set(Base.metadata.tables) | {"alembic_version"}


@pytest.fixture(params=["postgres", "sqlite"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'm2kt.db'}"
        return
    url = create_database(request.getfixturevalue("postgres_url"))
    yield url
    drop_database(url)


def test_upgrade_downgrade_upgrade(empty_database: str) -> None:
    engine = make_engine(empty_database)
    assert current_revision(engine) is None
    with pytest.raises(SchemaOutOfDate, match="m2kt broker migrate"):
        check_schema(engine)
    upgrade(empty_database)
    assert current_revision(engine) == head_revision()
    assert set(inspect(engine).get_table_names()) == TABLES
    check_schema(engine)
    downgrade(empty_database, "base")
    assert current_revision(engine) is None
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade(empty_database)
    assert set(inspect(engine).get_table_names()) == TABLES
    engine.dispose()


def test_models_match_the_migrations(empty_database: str) -> None:
    """Autogenerate finds nothing to do: the models and migrations/ agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    upgrade(empty_database)
    engine = make_engine(empty_database)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": False}), Base.metadata)
    engine.dispose()
    assert diff == []


def test_server_refuses_an_out_of_date_schema(postgres_url: str, tmp_path: Path) -> None:
    url = create_database(postgres_url)
    try:
        proc = subprocess.run(
            [str(Path(sys.executable).with_name("m2kt")), "broker", "serve", "--port", "0"],
            env={**os.environ, "M2KT_DATABASE_URL": url, "M2KT_STORAGE_URL": str(tmp_path / "blobs")},
            capture_output=True,
            text=True,
            timeout=600,  # a hang guard, not a time limit
        )
        assert proc.returncode == 3
        assert "refusing to start" in proc.stderr and "m2kt broker migrate" in proc.stderr

        def migrate() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [str(Path(sys.executable).with_name("m2kt")), "broker", "migrate"],
                env={**os.environ, "M2KT_DATABASE_URL": url},
                capture_output=True,
                text=True,
                timeout=600,  # a hang guard, not a time limit
            )

        first, again = migrate(), migrate()
        assert first.returncode == 0, first.stderr
        assert f"schema upgraded from an empty database to {head_revision()}" in first.stdout
        # an up-to-date database says so instead of repeating the upgrade's line (issue 19)
        assert again.returncode == 0 and f"schema already at {head_revision()}" in again.stdout
        assert "nothing to do" in again.stdout
    finally:
        drop_database(url)


def test_create_bucket_makes_a_missing_bucket_once(s3_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Outside docker-compose the bucket must exist before ``serve``; ``m2kt broker create-bucket`` makes it
    (issue 19), says so, and on a second run says it already exists."""
    import uuid

    bucket = f"created-{uuid.uuid4().hex[:12]}"
    env = {
        **os.environ,
        "M2KT_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "M2KT_STORAGE_URL": f"s3://{bucket}",
        "AWS_ENDPOINT_URL_S3": s3_server.endpoint,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_DEFAULT_REGION": s3_server.region,
    }
    m2kt = str(Path(sys.executable).with_name("m2kt"))

    def create() -> subprocess.CompletedProcess[str]:
        return subprocess.run([m2kt, "broker", "create-bucket"], env=env, capture_output=True, text=True, timeout=600)

    first = create()
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(f"created s3://{bucket}")
    s3_server.client().head_bucket(Bucket=bucket)  # it exists now
    again = create()
    assert again.returncode == 0 and again.stdout.startswith(f"already exists: s3://{bucket}"), again.stderr
