"""The embedded default: `m2kt broker serve` with nothing configured is a working broker."""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from pathlib import Path

import httpx

from m2kt.benchmarks.harness.brokers import BrokerProcess, register_node
from m2kt.benchmarks.harness.packets import packet_bytes
from m2kt.broker.services.upload import blob_key


def test_one_command_gives_a_working_broker(tmp_path: Path) -> None:
    env = {k: "" for k in os.environ if k.startswith("M2KT_") and not k.startswith("M2KT_TEST_")}
    broker = BrokerProcess(env, cwd=tmp_path, log_path=tmp_path / "broker.log").start()
    try:
        data_dir = tmp_path / "m2kt-data"
        token_file = data_dir / "admin-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        admin_token = token_file.read_text().strip()
        ready = httpx.get(f"{broker.url}/readyz").json()
        assert ready == {"status": "ready"}  # whether, never where: strangers learn no path
        stats = httpx.get(f"{broker.url}/v1/admin/stats", headers={"Authorization": f"Bearer {admin_token}"}).json()
        assert stats["storage"] == (data_dir / "blobs").resolve().as_uri()

        teacher = register_node(broker.url, admin_token, "teacher")
        data = packet_bytes(tmp_path, teacher.key, "demo.arith")
        r = teacher.http.post("/v1/topics/demo.arith/packets", content=data)
        assert r.status_code == 201, r.text
        packet_id = hashlib.sha256(data).hexdigest()
        (n,) = struct.unpack("<Q", data[:8])
        key = blob_key(hashlib.sha256(data[8 + n :]).hexdigest(), hashlib.sha256(data[: 8 + n]).hexdigest())
        assert (data_dir / "blobs" / key).read_bytes() == data
        assert list((data_dir / "blobs" / "incoming").iterdir()) == []
        assert teacher.http.get(f"/v1/packets/{packet_id}/blob").content == data
        assert (data_dir / "m2kt.db").exists()
    finally:
        broker.stop()
    # A restart finds its database, schema and admin as they were.
    again = BrokerProcess({}, cwd=tmp_path).start()
    try:
        r = httpx.get(f"{again.url}/v1/topics/demo.arith", headers={"Authorization": f"Bearer {admin_token}"})
        assert r.json()["packets"] == 1
    finally:
        again.stop()
