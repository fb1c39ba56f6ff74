"""Garbage collection of blobs no committed row points to: after the grace period only, never a
referenced blob, unfinished uploads too; from Python, from the admin route, on a timer, and from
``m2kt broker gc`` on the embedded default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from m2kt.benchmarks.harness.brokers import register_node, unique
from m2kt.benchmarks.harness.packets import packet_bytes
from m2kt.broker.gc import collect_garbage
from tests.conftest import LiveBroker, start_live_broker

ORPHAN = "packets/" + "a" * 64 + "-" + "b" * 64 + ".m2kt"


def _upload(url: str, token: str, topic: str, data: bytes) -> None:
    r = httpx.post(f"{url}/v1/topics/{topic}/packets", content=data, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 201, r.text


def _keys(s3c, bucket: str) -> set[str]:  # type: ignore[no-untyped-def]
    pages = s3c.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def _open_multipart(s3c, bucket: str) -> int:  # type: ignore[no-untyped-def]
    return len(s3c.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def test_gc_removes_only_old_unreferenced_blobs(
    live_broker: LiveBroker, s3_server, s3_bucket: str, tmp_path: Path
) -> None:
    s3c = s3_server.client()
    _, app, server = start_live_broker(
        live_broker.state.settings.database_url,  # type: ignore[attr-defined]
        s3_server,
        s3_bucket,
        tmp_path,
        token=live_broker.admin_token,
    )
    teacher = register_node(live_broker.url, live_broker.admin_token, "teacher")
    assert teacher.key
    topic = unique("gc")
    with server as url:
        _upload(url, teacher.token, topic, packet_bytes(tmp_path, teacher.key, topic))
    state = app.state.broker
    referenced = _keys(s3c, s3_bucket)
    assert len(referenced) == 1
    s3c.put_object(Bucket=s3_bucket, Key=ORPHAN, Body=b"left by a crash between promote and commit")
    s3c.put_object(Bucket=s3_bucket, Key="incoming/0123abcd", Body=b"a staged local-style upload")
    s3c.create_multipart_upload(Bucket=s3_bucket, Key="packets/" + "c" * 64 + "-" + "d" * 64 + ".m2kt")

    young = collect_garbage(state.sessions, state.storage, grace_seconds=3600)
    assert (young.scanned, young.referenced, young.young, young.deleted) == (2, 1, 1, [])
    assert young.unfinished_seen == 2 and young.unfinished_discarded == 0

    later = datetime.now(UTC) + timedelta(hours=2)
    dry = collect_garbage(state.sessions, state.storage, grace_seconds=3600, now=later, dry_run=True)
    assert dry.deleted == [ORPHAN] and dry.unfinished_discarded == 2
    assert ORPHAN in _keys(s3c, s3_bucket) and _open_multipart(s3c, s3_bucket) == 1

    done = collect_garbage(state.sessions, state.storage, grace_seconds=3600, now=later)
    assert done.deleted == [ORPHAN] and done.deleted_bytes > 0 and done.unfinished_discarded == 2
    assert done.referenced == 1 and not done.errors
    assert _keys(s3c, s3_bucket) == referenced  # the committed packet's blob is untouched
    assert _open_multipart(s3c, s3_bucket) == 0
    again = collect_garbage(state.sessions, state.storage, grace_seconds=0)
    assert again.deleted == [] and again.referenced == 1


def test_admin_route_and_timer(live_broker: LiveBroker, s3_server, s3_bucket: str, tmp_path: Path) -> None:
    s3c = s3_server.client()
    _, _, server = start_live_broker(
        live_broker.state.settings.database_url,  # type: ignore[attr-defined]
        s3_server,
        s3_bucket,
        tmp_path,
        token=live_broker.admin_token,
        gc_interval_seconds=0.3,
        gc_grace_seconds=0,
    )
    teacher = register_node(live_broker.url, live_broker.admin_token, "teacher")
    assert teacher.key
    topic = unique("gctimer")
    with server as url:
        admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {live_broker.admin_token}"})
        _upload(url, teacher.token, topic, packet_bytes(tmp_path, teacher.key, topic))
        kept = _keys(s3c, s3_bucket)
        s3c.put_object(Bucket=s3_bucket, Key=ORPHAN, Body=b"orphan")
        report = admin.post("/v1/admin/gc", params={"dry_run": True, "grace_seconds": 0})
        assert report.status_code == 200, report.text
        assert report.json()["dry_run"] is True and report.json()["deleted"] in ([ORPHAN], [])  # the timer may win
        deadline = time.monotonic() + 10
        while ORPHAN in _keys(s3c, s3_bucket) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _keys(s3c, s3_bucket) == kept, "the timer did not remove the orphan, or removed a referenced blob"
        assert teacher.http.post(url + "/v1/admin/gc").status_code == 403


def test_cli_gc_on_the_embedded_default(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("M2KT_")}
    env["M2KT_DATA_DIR"] = str(tmp_path)
    m2kt = str(Path(sys.executable).with_name("m2kt"))
    subprocess.run([m2kt, "broker", "migrate"], env=env, check=True, capture_output=True)
    blobs = tmp_path / "blobs"
    (blobs / "packets").mkdir(parents=True)
    (blobs / "incoming").mkdir()
    (blobs / ORPHAN).write_bytes(b"orphan")
    (blobs / "incoming" / "0123abcd").write_bytes(b"staged")

    dry = subprocess.run(
        [m2kt, "broker", "gc", "--grace-seconds", "0", "--dry-run"], env=env, capture_output=True, text=True
    )
    assert dry.returncode == 0, dry.stderr
    assert "would remove 1 orphans" in dry.stdout and (blobs / ORPHAN).exists()

    run = subprocess.run(
        [m2kt, "broker", "gc", "--grace-seconds", "0", "--json"], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["deleted"] == [ORPHAN] and report["unfinished_discarded"] == 1 and report["errors"] == []
    assert not (blobs / ORPHAN).exists() and not (blobs / "incoming" / "0123abcd").exists()

    default = subprocess.run([m2kt, "broker", "gc"], env=env, capture_output=True, text=True)  # 1 h grace
    assert default.returncode == 0 and "scanned 0 blobs" in default.stdout
