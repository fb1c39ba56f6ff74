"""``M2KT_INLINE_BLOB_MAX_BYTES``: small packets kept in the broker's database, large ones in S3, both served
and verified alike; garbage collection sees both; turning the setting off keeps inline packets readable.

A broker on a database of its own (Postgres) and a fresh bucket (nanio), served on a loopback socket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from m2kt import BrokerClient
from m2kt.benchmarks.harness.brokers import BrokerProcess, register_node, unique
from m2kt.benchmarks.harness.packets import make_tensors, packet_bytes
from m2kt.benchmarks.harness.services import S3Server
from m2kt.broker.db import make_engine
from m2kt.broker.gc import collect_garbage
from m2kt.broker.models import InlineBlob, Packet
from m2kt.broker.storage import DatabaseStore, TieredStore
from tests.conftest import migrated_database, start_live_broker

LIMIT = 64 << 10
ORPHAN = "packets/" + "e" * 64 + "-" + "f" * 64 + ".m2kt"


@pytest.fixture
def database(postgres_url: str) -> Iterator[str]:
    with migrated_database(postgres_url) as url:
        yield url


def _bucket_keys(s3: S3Server, bucket: str) -> set[str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def _publish(url: str, token: str, topic: str, data: bytes) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/topics/{topic}/packets", content=data, headers={"Authorization": f"Bearer {token}"}, timeout=60
    )


def _large_tensors() -> dict[str, np.ndarray]:
    traces = np.random.default_rng(3).standard_normal((2048, 64), dtype=np.float32)  # 512 KiB
    return {**make_tensors(seed=3), "traces": traces}


def test_small_packets_in_the_database_large_in_s3_served_and_collected_alike(
    database: str, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    token, app, server = start_live_broker(database, s3_server, s3_bucket, tmp_path, inline_blob_max_bytes=LIMIT)
    state = app.state.broker
    assert isinstance(state.storage, TieredStore) and state.storage.small.max_bytes == LIMIT
    with server as url:
        teacher = register_node(url, token, "teacher")
        student = register_node(url, token, "student", with_key=False)
        assert teacher.key is not None
        topic = unique("inline")
        small = packet_bytes(tmp_path, teacher.key, topic, seed=1)
        large = packet_bytes(tmp_path, teacher.key, topic, tensors=_large_tensors())
        assert len(small) <= LIMIT < len(large)
        published = []
        for data in (small, large):
            r = _publish(url, teacher.token, topic, data)
            assert r.status_code == 201, r.text
            published.append(r.json())
        again = _publish(url, teacher.token, topic, small)
        assert again.status_code == 200 and again.json()["id"] == published[0]["id"]  # stored before: a no-op

        engine = make_engine(database)
        with engine.connect() as connection:
            keys = dict(connection.execute(select(Packet.id, Packet.storage_key)).all())
            inline = connection.execute(select(InlineBlob.key, InlineBlob.size)).all()
        small_key, large_key = keys[published[0]["id"]], keys[published[1]["id"]]
        assert [(row.key, row.size) for row in inline] == [(small_key, len(small))]
        assert _bucket_keys(s3_server, s3_bucket) == {large_key}

        for prefer_redirect in (True, False):  # a small packet has no presigned URL: the broker streams it
            with BrokerClient(url, student.token, quiet=True, prefer_redirect=prefer_redirect) as client:
                for record, data in zip(published, (small, large), strict=True):
                    fetched = client.fetch(record["id"], tmp_path / f"{prefer_redirect}-{record['id']}.m2kt")
                    assert fetched.path.read_bytes() == data and fetched.size == len(data)

        DatabaseStore(engine, LIMIT).put(ORPHAN, b"left by a crash between the blob and its row")
        later = datetime.now(UTC) + timedelta(hours=2)
        report = collect_garbage(state.sessions, state.storage, grace_seconds=3600, now=later)
        assert report.deleted == [ORPHAN] and report.referenced == 2 and not report.errors
        assert [row.key for row in DatabaseStore(engine, LIMIT).list()] == [small_key]
        engine.dispose()

    # The setting back at 0: the inline packet is still served, a new small one goes to S3.
    _, app, server = start_live_broker(database, s3_server, s3_bucket, tmp_path / "off", token=token)
    with server as url:
        assert isinstance(app.state.broker.storage, TieredStore)  # found inline blobs at start-up
        assert app.state.broker.storage.small.max_bytes == 0
        with BrokerClient(url, student.token, quiet=True) as client:
            fetched = client.fetch(published[0]["id"], tmp_path / "after-off.m2kt")
            assert fetched.path.read_bytes() == small
        newer = packet_bytes(tmp_path, teacher.key, topic, seed=2)
        r = _publish(url, teacher.token, topic, newer)
        assert r.status_code == 201, r.text
        assert len(_bucket_keys(s3_server, s3_bucket)) == 2


def test_embedded_default_keeps_small_packets_in_its_sqlite_database(tmp_path: Path) -> None:
    """The embedded default (SQLite, a blob directory) with inline blobs: the bytes go in with the row."""
    env = {k: "" for k in os.environ if k.startswith("M2KT_") and not k.startswith("M2KT_TEST_")}
    env["M2KT_INLINE_BLOB_MAX_BYTES"] = str(LIMIT)
    broker = BrokerProcess(env, cwd=tmp_path, log_path=tmp_path / "broker.log").start()
    try:
        data_dir = tmp_path / "m2kt-data"
        admin_token = (data_dir / "admin-token").read_text().strip()
        teacher = register_node(broker.url, admin_token, "teacher")
        assert teacher.key is not None
        data = packet_bytes(tmp_path, teacher.key, "demo.inline")
        r = teacher.http.post("/v1/topics/demo.inline/packets", content=data)
        assert r.status_code == 201, r.text
        assert teacher.http.post("/v1/topics/demo.inline/packets", content=data).status_code == 200
        assert teacher.http.get(f"/v1/packets/{r.json()['id']}/blob").content == data
        files = [p for p in (data_dir / "blobs").rglob("*") if p.is_file()]
        assert files == []  # nothing in the blob directory
        engine = make_engine(f"sqlite:///{data_dir / 'm2kt.db'}")
        with engine.connect() as connection:
            assert connection.execute(select(InlineBlob.body)).scalars().all() == [data]
        DatabaseStore(engine, LIMIT).put(ORPHAN, b"left by a crash")
        engine.dispose()
    finally:
        broker.stop()
    # `m2kt broker gc`, with the setting off: it still finds the inline blobs, keeps the packet's, drops the orphan.
    cli_env = {k: v for k, v in os.environ.items() if not k.startswith("M2KT_")} | {"M2KT_DATA_DIR": str(data_dir)}
    m2kt = str(Path(sys.executable).with_name("m2kt"))
    run = subprocess.run(
        [m2kt, "broker", "gc", "--grace-seconds", "0", "--json"], env=cli_env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["deleted"] == [ORPHAN] and report["referenced"] == 1 and report["errors"] == []
