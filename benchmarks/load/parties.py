"""Who takes part in a load run: its settings, the teacher and student nodes, their packets."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from m2kt.benchmarks.harness.packets import make_body, make_tensors
from m2kt.benchmarks.harness.services import DEFAULT_DATABASE_URL
from m2kt.format import write_packet
from m2kt.format.key_proof import prove_key
from m2kt.format.keys import SigningKey
from m2kt.sdk import calls

RETRY_STATUSES = frozenset({0, 429, 500, 502, 503, 504})  # 0: no answer (connection error, timeout)
REQUEST_TIMEOUT = 120.0


# ----------------------------------------------------------------------------- settings and parties


@dataclass
class LoadConfig:
    publishers: int = 50
    packets: int = 20
    subscribers: int = 10
    timeout: float = 300.0
    database_url: str = DEFAULT_DATABASE_URL
    rate_limit: bool = False
    workers: int = 1  # m2kt broker serve --workers
    upload_rate: float | None = None
    upload_burst: int | None = None
    fetch: bool = False
    size_kib: int = 0
    wait: float = 10.0
    limit: int = 100
    max_retries: int = 20
    inline_blob_max_bytes: int = 0  # M2KT_INLINE_BLOB_MAX_BYTES: packets up to this size kept in the database

    def broker_env(self) -> dict[str, str]:
        """Settings for the broker process: no upload rate limit unless asked for."""
        env: dict[str, str] = {} if self.rate_limit else {"M2KT_UPLOAD_RATE_PER_MINUTE": "0"}
        if self.inline_blob_max_bytes:
            env["M2KT_INLINE_BLOB_MAX_BYTES"] = str(self.inline_blob_max_bytes)
        if self.upload_rate is not None:
            env["M2KT_UPLOAD_RATE_PER_MINUTE"] = f"{self.upload_rate:g}"
        if self.upload_burst is not None:
            env["M2KT_UPLOAD_BURST"] = str(self.upload_burst)
        return env


@dataclass
class Party:
    """A node of the run: its name, token and (publishers) signing key and packets (id, bytes)."""

    name: str
    token: str
    key: SigningKey | None = None
    packets: list[tuple[str, bytes]] = field(default_factory=list)


def register(admin: httpx.Client, role: str, with_key: bool) -> Party:
    """A new node with its own token and, for publishers, its own registered signing key."""
    name = f"load-{role}-{uuid.uuid4().hex[:8]}"
    r = admin.post("/v1/nodes", json={"name": name, "role": role})
    if r.status_code != 201:
        raise RuntimeError(f"POST /v1/nodes answered {r.status_code}: {r.text[:300]}")
    party = Party(name, r.json()["token"]["token"])
    if with_key:
        party.key = SigningKey.generate()
        r = admin.post(
            "/v1/keys",
            json=calls.register_key(prove_key(party.key, name)).json,
            headers={"Authorization": f"Bearer {party.token}"},
        )
        if r.status_code != 201:
            raise RuntimeError(f"POST /v1/keys answered {r.status_code}: {r.text[:300]}")
    return party


def packet(tmp: Path, key: SigningKey, topic: str, seed: int, size_kib: int) -> tuple[str, bytes]:
    """One small signed packet, distinct by ``seed``; returns (id = sha256 of the file, bytes)."""
    tensors = make_tensors(seed=seed)
    if size_kib > 0:  # pad with a float16 traces tensor of about size_kib KiB
        rows = max(1, size_kib * 1024 // (3 * 8 * 2))
        tensors["traces"] = np.random.default_rng(seed).standard_normal((rows, 3, 8)).astype(np.float16)
    path = tmp / f"{seed}.m2kt"
    write_packet(path, make_body(topic=topic), tensors, key)
    data = path.read_bytes()
    path.unlink()
    return hashlib.sha256(data).hexdigest(), data


def build_packets(tmp: Path, publishers: list[Party], topic: str, per_publisher: int, size_kib: int) -> None:
    for i, pub in enumerate(publishers):
        assert pub.key is not None
        pub.packets = [packet(tmp, pub.key, topic, i * per_publisher + j, size_kib) for j in range(per_publisher)]
    ids = [pid for pub in publishers for pid, _ in pub.packets]
    if len(set(ids)) != len(ids):
        raise RuntimeError("the pre-built packets are not all distinct")
