"""Failures mid-upload on real processes: the broker SIGKILLed, and the S3 server going away.
Neither may leave a row pointing at a missing blob, and the same upload succeeds afterwards."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from broker.db import make_engine
from broker.models import Packet
from broker.services.upload import blob_key
from tests.broker_harness import BrokerProcess, Node, packet_bytes, register_node, s3_env, unique
from tests.conftest import LiveBroker, make_tensors, start_live_broker
from tests.services import start_nanio

MiB = 1 << 20


def big_packet(tmp: Path, node: Node, topic: str, mib: int = 24) -> bytes:
    rng = np.random.default_rng(7)
    tensors = {**make_tensors(), "attention": rng.random((mib * MiB // 4 // 1024, 1024), dtype=np.float32)}
    return packet_bytes(tmp, node.key, topic, tensors=tensors)


def key_of(data: bytes) -> str:
    """The storage key the broker gives these packet bytes."""
    (n,) = struct.unpack("<Q", data[:8])
    return blob_key(hashlib.sha256(data[8 + n :]).hexdigest(), hashlib.sha256(data[: 8 + n]).hexdigest())


def rows_pointing_at_missing_blobs(database_url: str, storage, ids: list[str] | None = None) -> list[str]:  # type: ignore[no-untyped-def]
    """Packet rows (all, or those in ``ids``) whose blob is not in ``storage``."""
    engine = make_engine(database_url)
    query = select(Packet.id, Packet.storage_key)
    if ids is not None:
        query = query.where(Packet.id.in_(ids))
    with engine.connect() as conn:
        keys = conn.execute(query).all()
    engine.dispose()
    return [pid for pid, key in keys if not storage.exists(key)]


def body_that(data: bytes, after_bytes: int, action, *, then_stop: bool = True) -> object:  # type: ignore[no-untyped-def]
    """A request body that runs ``action`` once ``after_bytes`` have been sent, then ends (or, with
    ``then_stop=False``, sends the rest)."""

    def gen():  # type: ignore[no-untyped-def]
        sent = 0
        for i in range(0, len(data), MiB):
            if sent >= after_bytes and action is not None and not action_done:
                action()
                action_done.append(True)
                if then_stop:
                    return
            yield data[i : i + MiB]
            sent += MiB

    action_done: list[bool] = []
    return gen()


def test_broker_killed_mid_upload_leaves_no_dangling_row(
    live_broker: LiveBroker, broker_database: str, broker_bucket: str, s3_server, tmp_path: Path
) -> None:
    teacher = register_node(live_broker.url, live_broker.admin_token, "teacher")
    topic = unique("kill")
    data = big_packet(tmp_path, teacher, topic)
    packet_id = hashlib.sha256(data).hexdigest()
    env = {
        "M2KT_DATABASE_URL": broker_database,
        "M2KT_STORAGE_URL": f"s3://{broker_bucket}",
        "M2KT_DATA_DIR": str(tmp_path),
        **s3_env(s3_server),
    }
    broker = BrokerProcess(env, log_path=tmp_path / "broker.log").start()
    headers = {"Authorization": f"Bearer {teacher.token}"}
    with pytest.raises(httpx.TransportError):
        httpx.post(
            f"{broker.url}/v1/topics/{topic}/packets",
            headers=headers,
            timeout=60,
            content=body_that(data, 12 * MiB, broker.kill),
        )
    assert broker.proc is not None and broker.proc.returncode == -9
    storage = live_broker.state.storage  # type: ignore[attr-defined]
    with live_broker.state.sessions() as session:  # type: ignore[attr-defined]
        assert session.get(Packet, packet_id) is None
    assert not storage.exists(key_of(data))  # the multipart upload on the final key was never completed
    assert rows_pointing_at_missing_blobs(broker_database, storage) == []

    restarted = BrokerProcess(env, log_path=tmp_path / "broker2.log").start()
    try:
        r = httpx.post(f"{restarted.url}/v1/topics/{topic}/packets", content=data, headers=headers, timeout=120)
        assert r.status_code == 201, r.text
        fetched = httpx.get(f"{restarted.url}/v1/packets/{packet_id}/blob", headers=headers, timeout=120)
        assert hashlib.sha256(fetched.content).hexdigest() == packet_id
        assert storage.exists(key_of(data))
    finally:
        restarted.stop()


def test_s3_going_away_mid_upload_is_503_and_recoverable(
    live_broker: LiveBroker, broker_database: str, tmp_path: Path
) -> None:
    teacher = register_node(live_broker.url, live_broker.admin_token, "teacher")
    data_dir = tmp_path / "s3"
    nanio, s3 = start_nanio(data_dir)
    bucket = "fault-bucket"
    s3.client().create_bucket(Bucket=bucket)
    topic = unique("s3gone")
    data = big_packet(tmp_path, teacher, topic)
    packet_id = hashlib.sha256(data).hexdigest()
    _, app, server = start_live_broker(broker_database, s3, bucket, tmp_path, token=live_broker.admin_token)
    headers = {"Authorization": f"Bearer {teacher.token}"}
    try:
        with server as url:

            def stop_s3() -> None:
                nanio.kill()
                nanio.wait()

            try:
                r = httpx.post(
                    f"{url}/v1/topics/{topic}/packets",
                    headers=headers,
                    timeout=60,
                    # The whole body is sent: the parts after the outage fail (parts are sent in the
                    # background, so the ones before it may already be stored).
                    content=body_that(data, 12 * MiB, stop_s3, then_stop=False),
                )
                assert (r.status_code, r.json()["code"]) == (503, "storage_unavailable"), r.text
            except httpx.TransportError:
                pass  # the broker may answer before it has read the whole body
            ready = httpx.get(f"{url}/readyz")
            assert (ready.status_code, ready.json()["code"]) == (503, "storage_unavailable")
            with app.state.broker.sessions() as session:
                assert session.get(Packet, packet_id) is None
                assert session.scalars(select(Packet).where(Packet.storage_key == key_of(data))).all() == []

            # S3 comes back on the same port and data: the same upload now succeeds.
            port = int(s3.endpoint.rsplit(":", 1)[1])
            nanio, _ = start_nanio(data_dir, port=port)
            assert httpx.get(f"{url}/readyz").status_code == 200
            r = httpx.post(f"{url}/v1/topics/{topic}/packets", content=data, headers=headers, timeout=120)
            assert r.status_code == 201, r.text
            assert rows_pointing_at_missing_blobs(broker_database, app.state.broker.storage, [packet_id]) == []
            # One blob. (The multipart upload cut off by the outage could not be aborted while S3 was away: it
            # stays invisible until an S3 lifecycle rule for incomplete multipart uploads removes it.)
            assert [b.key for b in app.state.broker.storage.list("packets/")] == [key_of(data)]
            assert httpx.get(f"{url}/v1/packets/{packet_id}/blob", headers=headers, timeout=120).content == data
    finally:
        nanio.kill()
        nanio.wait()
