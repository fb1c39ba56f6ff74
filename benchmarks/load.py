"""Load: N concurrent publishers and M subscribers on one topic, bounded in count and in time.

    python -m benchmarks.load --publishers 50 --packets 20 --subscribers 10
    python -m benchmarks.load --publishers 4 --packets 3 --subscribers 2 --timeout 60 --out /tmp/load

Real processes on loopback (benchmarks/_stack.py): nanio (file-backed S3), a throw-away PostgreSQL
database and ``m2kt broker serve``; the publishers and subscribers are coroutines in this process.

* Publishers: each is its own teacher node with its own registered signing key. Its packets are
  small and distinct (seeded tensors), built and signed before the clock starts and sent from
  memory, so the client spends little CPU on the two cores it shares with the broker. All
  publishers send to ONE shared topic — the hardest case for the topic's seq lock, and every
  subscriber must see every packet. Each publisher has one upload in flight, all at once.
  429 (honouring ``Retry-After``), 5xx and connection errors are retried (same bytes, same
  record) and counted.
* Subscribers: each is its own student node with a durable subscription (a cursor kept by the
  broker) made before publishing starts. It long-polls ``GET /v1/subscriptions/{name}/packets?wait=``
  and acknowledges each page's last seq after handling it (``POST …/ack``; the SDK's ``subscribe``
  acks per event, the cursor works the same way) until it has every accepted packet, or the
  deadline. ``--fetch`` also downloads and verifies every delivered packet (``AsyncBrokerClient
  .fetch``, presigned redirect), as the SDK's ``subscribe`` does.
* Publish-to-delivery latency: when the page carrying the event arrived, minus the publisher's
  first send of that packet (one clock, ``perf_counter``); also minus the moment the publisher
  read its 201 — this one can be negative, since the event may reach a subscriber first.
* Duplicates: per subscription cursor, deliveries of a packet id it had already been delivered.
  After the run every subscription is polled once more with ``wait=0``: anything still returned
  after the acknowledged cursor counts too. Losses: accepted ids a subscription never got.
* Reference, in the same process and against the same nanio: boto3 ``put_object`` of the same
  bytes, one thread per publisher sending its packets in turn (the same concurrency).
* Broker RSS: sampled every 20 ms during the load (before: after setup and a warm-up; peak; after).

The broker runs with ``M2KT_UPLOAD_RATE_PER_MINUTE=0`` (no per-node rate limit) unless ``--rate-limit``
(keep its limits, count the 429s) or ``--upload-rate``/``--upload-burst`` are given. Writes ``load.md``
and ``load.json`` under ``--out`` (default benchmarks/results). Exit status 1 when anything was lost,
duplicated, delivered unasked, refused, or the deadline cut the run short.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `tests` (the harness) lives at the repository root
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from benchmarks._stack import BrokerStack, broker_stack  # noqa: E402
from benchmarks.broker_memory import CPUTimes, MiB, RSSSampler, log_problems  # noqa: E402
from client import AsyncBrokerClient  # noqa: E402
from client._retry import parse_retry_after  # noqa: E402
from client.keys import SigningKey  # noqa: E402
from client.packet import write_packet  # noqa: E402
from tests.conftest import make_body, make_tensors  # noqa: E402
from tests.services import DEFAULT_DATABASE_URL  # noqa: E402

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
    upload_rate: float | None = None
    upload_burst: int | None = None
    fetch: bool = False
    size_kib: int = 0
    wait: float = 10.0
    limit: int = 100
    max_retries: int = 20

    def broker_env(self) -> dict[str, str]:
        """Settings for the broker process: no upload rate limit unless asked for."""
        env: dict[str, str] = {} if self.rate_limit else {"M2KT_UPLOAD_RATE_PER_MINUTE": "0"}
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
            json={"public_key": party.key.verify_key.to_pem()},
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


# ----------------------------------------------------------------------------- publishing


@dataclass
class Outcome:
    """What became of one packet: every attempt's wall time, the last answer, the retries."""

    packet_id: str
    publisher: int
    size: int
    first_sent: float
    answered: float = 0.0
    status: int = 0
    code: str = ""
    record_status: str = ""
    attempts: int = 0
    request_seconds: list[float] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    retry_waits: list[float] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return self.status in (200, 201) and self.record_status == "accepted"


def error_code(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    return str(body.get("code", "")) if isinstance(body, dict) else ""


async def publish_one(
    http: httpx.AsyncClient,
    topic: str,
    packet_id: str,
    data: bytes,
    publisher: int,
    deadline: float,
    max_retries: int,
    sleep: Any = asyncio.sleep,
) -> Outcome:
    """POST one packet; retry on 429 (after ``Retry-After``), 5xx and no answer, until the deadline."""
    out = Outcome(packet_id, publisher, len(data), time.perf_counter())
    headers = {"Content-Type": "application/octet-stream"}
    while True:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            out.code = "deadline"
            return out
        t0 = time.perf_counter()
        out.attempts += 1
        retry_after: float | None = None
        try:
            r = await http.post(
                f"/v1/topics/{topic}/packets", content=data, headers=headers, timeout=min(REQUEST_TIMEOUT, remaining)
            )
            out.status, out.code = r.status_code, error_code(r) if r.status_code >= 400 else ""
            retry_after = parse_retry_after(r.headers.get("retry-after"))
            if r.status_code in (200, 201):
                record = r.json()
                out.record_status = record["status"]
                if record["id"] != packet_id:
                    out.code = f"id_mismatch:{record['id'][:16]}"
        except httpx.TransportError as exc:
            out.status, out.code = 0, type(exc).__name__
        out.answered = time.perf_counter()
        out.request_seconds.append(out.answered - t0)
        if out.status not in RETRY_STATUSES or out.attempts > max_retries:
            return out
        wait = retry_after if retry_after is not None else min(0.1 * 2 ** (out.attempts - 1), 5.0)
        if time.perf_counter() + wait >= deadline:
            out.code = f"deadline after {out.status} {out.code}".strip()
            return out
        out.retried.append(f"{out.status} {out.code}".strip())
        out.retry_waits.append(wait)
        await sleep(wait)


@dataclass
class RunState:
    """Shared by the coroutines: accepted packets so far, and whether publishing has ended."""

    accepted: dict[str, Outcome] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    published: asyncio.Event = field(default_factory=asyncio.Event)


async def run_publisher(
    base_url: str, pub: Party, index: int, topic: str, state: RunState, deadline: float, max_retries: int
) -> None:
    """Send this publisher's packets one after another, as fast as the broker answers."""
    headers = {"Authorization": f"Bearer {pub.token}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=REQUEST_TIMEOUT) as http:
        for packet_id, data in pub.packets:
            out = await publish_one(http, topic, packet_id, data, index, deadline, max_retries)
            state.outcomes.append(out)
            if out.accepted:
                state.accepted[packet_id] = out


# ----------------------------------------------------------------------------- subscribing


@dataclass
class Delivery:
    seq: int
    packet_id: str
    received: float


@dataclass
class SubscriberLog:
    name: str
    subscription: str
    deliveries: list[Delivery] = field(default_factory=list)
    other_events: int = 0
    polls: int = 0
    acks: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    fetch_seconds: list[float] = field(default_factory=list)
    leftover: list[str] = field(default_factory=list)  # ids still returned after the final cursor
    cursor: int = 0
    finished: bool = False

    def seen(self) -> set[str]:
        return {d.packet_id for d in self.deliveries}


async def poll(http: httpx.AsyncClient, log: SubscriberLog, wait: float, limit: int) -> dict[str, Any] | None:
    """One long-poll of the subscription; None (and a counted error) when it did not answer 200."""
    log.polls += 1
    try:
        r = await http.get(
            f"/v1/subscriptions/{log.subscription}/packets",
            params={"wait": wait, "limit": limit},
            timeout=wait + 30,
        )
    except httpx.TransportError as exc:
        log.errors[f"poll {type(exc).__name__}"] += 1
        return None
    if r.status_code != 200:
        log.errors[f"poll {r.status_code} {error_code(r)}"] += 1
        return None
    return r.json()


async def poll_unless_finished(
    http: httpx.AsyncClient, log: SubscriberLog, state: RunState, wait: float, limit: int
) -> tuple[bool, dict[str, Any] | None]:
    """(finished, page): a long-poll that is dropped when publishing ends and this subscriber has it all."""
    task = asyncio.ensure_future(poll(http, log, wait, limit))
    if not state.published.is_set():
        ended = asyncio.ensure_future(state.published.wait())
        await asyncio.wait({task, ended}, return_when=asyncio.FIRST_COMPLETED)
        ended.cancel()
        if not task.done() and set(state.accepted) <= log.seen():
            task.cancel()  # a GET: dropping it leaves the cursor where the last ack put it
            return True, None
    return False, await task


async def ack(http: httpx.AsyncClient, log: SubscriberLog, cursor: int) -> None:
    """Move the kept cursor; retried until it answers 200 (the cursor only moves forward)."""
    for attempt in range(10):
        try:
            r = await http.post(f"/v1/subscriptions/{log.subscription}/ack", json={"cursor": cursor})
        except httpx.TransportError as exc:
            log.errors[f"ack {type(exc).__name__}"] += 1
        else:
            if r.status_code == 200:
                log.acks += 1
                log.cursor = r.json()["cursor"]
                return
            log.errors[f"ack {r.status_code} {error_code(r)}"] += 1
        await asyncio.sleep(0.1 * 2**attempt)
    raise RuntimeError(f"{log.name}: the ack of cursor {cursor} failed 10 times")


async def handle(page: dict[str, Any], log: SubscriberLog, received: float, fetcher: Any, inbox: Path | None) -> None:
    """Record a page's events; with ``fetcher``, download and verify each published packet."""
    for item in page["items"]:
        if item["kind"] != "published":
            log.other_events += 1
            continue
        log.deliveries.append(Delivery(item["seq"], item["packet"]["id"], received))
        if fetcher is not None and inbox is not None:
            t0 = time.perf_counter()
            fetched = await fetcher.fetch(item["packet"]["id"], inbox)
            log.fetch_seconds.append(time.perf_counter() - t0)
            fetched.path.unlink()


async def run_subscriber(
    base_url: str, sub: Party, log: SubscriberLog, state: RunState, cfg: LoadConfig, deadline: float, inbox: Path
) -> None:
    """Consume the subscription until publishing has ended and every accepted packet is here."""
    headers = {"Authorization": f"Bearer {sub.token}"}
    fetcher = AsyncBrokerClient(base_url, sub.token, quiet=True, prefer_redirect=True) if cfg.fetch else None
    try:
        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as http:
            while True:
                if state.published.is_set() and set(state.accepted) <= log.seen():
                    break
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    return
                finished, page = await poll_unless_finished(http, log, state, min(cfg.wait, remaining), cfg.limit)
                if finished:
                    break
                if page is None:  # an error, counted: try again shortly
                    await asyncio.sleep(0.2)
                    continue
                await handle(page, log, time.perf_counter(), fetcher, inbox if cfg.fetch else None)
                if page["items"]:
                    await ack(http, log, page["cursor"])
            log.finished = True
    finally:
        if fetcher is not None:
            await fetcher.aclose()


async def leftovers(base_url: str, sub: Party, log: SubscriberLog) -> None:
    """After the run: what the subscription still returns after its acknowledged cursor (should be nothing)."""
    headers = {"Authorization": f"Bearer {sub.token}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as http:
        page = await poll(http, log, 0, 1000)
        if page is not None:
            log.leftover = [i["packet"]["id"] for i in page["items"] if i["kind"] == "published"]
        r = await http.get(f"/v1/subscriptions/{log.subscription}")
        if r.status_code == 200:
            log.cursor = r.json()["cursor"]


# ----------------------------------------------------------------------------- the run


@dataclass
class LoadPhase:
    state: RunState
    logs: list[SubscriberLog]
    loadavg: tuple[tuple[float, ...], tuple[float, ...]]  # the machine's 1/5/15-min load, before and after
    started: float
    publish_ended: float
    ended: float
    complete: bool
    cut_short: list[str]


async def load_phase(
    base_url: str, publishers: list[Party], subscribers: list[Party], topic: str, cfg: LoadConfig, tmp: Path
) -> LoadPhase:
    """Publishers and subscribers all at once, under one deadline."""
    state = RunState()
    logs = [SubscriberLog(s.name, f"load-{i}") for i, s in enumerate(subscribers)]
    load_before = os.getloadavg()
    started = time.perf_counter()
    deadline = started + cfg.timeout
    subs = [
        asyncio.ensure_future(run_subscriber(base_url, s, log, state, cfg, deadline, tmp / f"inbox-{i}"))
        for i, (s, log) in enumerate(zip(subscribers, logs, strict=True))
    ]
    pubs = [
        asyncio.ensure_future(run_publisher(base_url, p, i, topic, state, deadline, cfg.max_retries))
        for i, p in enumerate(publishers)
    ]
    _, late_pubs = await asyncio.wait(pubs, timeout=max(0.0, deadline - time.perf_counter()))
    publish_ended = time.perf_counter()
    state.published.set()
    _, late_subs = await asyncio.wait(subs, timeout=max(0.1, deadline - time.perf_counter()))
    for task in (*late_pubs, *late_subs):
        task.cancel()
    await asyncio.gather(*pubs, *subs, return_exceptions=True)
    failures = [t.exception() for t in (*pubs, *subs) if not t.cancelled() and t.exception() is not None]
    ended = time.perf_counter()
    await asyncio.gather(*(leftovers(base_url, s, log) for s, log in zip(subscribers, logs, strict=True)))
    cut_short = [repr(f) for f in failures]
    unfinished = sum(1 for log in logs if not log.finished)
    timed_out = sum(1 for o in state.outcomes if o.code.startswith("deadline"))
    if timed_out:
        cut_short.append(f"{timed_out} publish(es) given up at the deadline")
    if late_pubs or unfinished:
        cut_short.insert(
            0, f"at the deadline {len(late_pubs)} publisher(s), {unfinished} subscriber(s) had not finished"
        )
    loadavg = (load_before, os.getloadavg())
    return LoadPhase(state, logs, loadavg, started, publish_ended, ended, not cut_short, cut_short)


def warm_up(base_url: str, pub: Party, sub: Party, topic: str, tmp: Path) -> None:
    """One publish and one subscription read on a side topic: first-request imports and pools."""
    assert pub.key is not None
    _, data = packet(tmp, pub.key, topic, 10**9, 0)
    with httpx.Client(base_url=base_url, timeout=60) as http:
        r = http.post(
            f"/v1/topics/{topic}/packets",
            content=data,
            headers={"Authorization": f"Bearer {pub.token}", "Content-Type": "application/octet-stream"},
        )
        if r.status_code not in (200, 201):
            raise RuntimeError(f"warm-up publish answered {r.status_code}: {r.text[:300]}")
        auth = {"Authorization": f"Bearer {sub.token}"}
        http.put("/v1/subscriptions/load-warm", json={"topic": topic}, headers=auth).raise_for_status()
        http.get("/v1/subscriptions/load-warm/packets", params={"wait": 0}, headers=auth).raise_for_status()


def subscribe_all(base_url: str, subscribers: list[Party], topic: str) -> None:
    """Each subscriber's durable subscription (cursor 0), made before anything is published."""
    with httpx.Client(base_url=base_url, timeout=60) as http:
        for i, sub in enumerate(subscribers):
            r = http.put(
                f"/v1/subscriptions/load-{i}", json={"topic": topic}, headers={"Authorization": f"Bearer {sub.token}"}
            )
            if r.status_code != 201:
                raise RuntimeError(f"PUT subscription answered {r.status_code}: {r.text[:300]}")


@dataclass
class Reference:
    seconds: float
    put_seconds: list[float]
    count: int
    size: int


def raw_s3_reference(stack: BrokerStack, publishers: list[Party]) -> Reference:
    """boto3 put_object of the same bytes to the same nanio, one thread per publisher, packets in turn."""
    import boto3
    from botocore.config import Config

    s3 = stack.s3
    client = boto3.client(
        "s3",
        endpoint_url=s3.endpoint,
        aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
        region_name=s3.region,
        config=Config(signature_version="s3v4", max_pool_connections=max(10, len(publishers))),
    )
    client.put_object(Bucket=stack.bucket, Key="raw-load/warm", Body=b"warm")
    lock = threading.Lock()
    put_seconds: list[float] = []

    def worker(pub: Party) -> None:
        for packet_id, data in pub.packets:
            t0 = time.perf_counter()
            client.put_object(Bucket=stack.bucket, Key=f"raw-load/{packet_id}", Body=data)
            with lock:
                put_seconds.append(time.perf_counter() - t0)

    with ThreadPoolExecutor(max_workers=len(publishers)) as pool:
        t0 = time.perf_counter()
        list(pool.map(worker, publishers))
        seconds = time.perf_counter() - t0
    size = sum(len(d) for p in publishers for _, d in p.packets)
    return Reference(seconds, put_seconds, len(put_seconds), size)


class PostgresCPU:
    """≈ CPU seconds of the Postgres backends serving one database while a block runs.

    Backends are found by their title (``postgres: 15/main: USER DB …``) every 0.25 s; one that
    exits between two looks loses at most that much of its time."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.seconds = 0.0
        self._start: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()

    def _look(self) -> dict[int, float]:
        out = {}
        for proc in psutil.process_iter(["name", "cmdline"]):
            try:
                title = " ".join(proc.info["cmdline"] or [])
                if title.startswith("postgres:") and f" {self.database} " in title + " ":
                    out[proc.pid] = sum(proc.cpu_times()[:2])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self._last.update(self._look())

    def __enter__(self) -> PostgresCPU:
        self._start = self._look()
        self._last = dict(self._start)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._last.update(self._look())
        self.seconds = sum(t - self._start.get(pid, 0.0) for pid, t in self._last.items())


# ----------------------------------------------------------------------------- the report


def percentiles(seconds: list[float]) -> dict[str, float | int | None]:
    """n, p50, p95, p99 and max, in milliseconds."""
    if not seconds:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"n": len(ms), "p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(ms.max())}


def subscriber_summary(log: SubscriberLog, accepted: set[str]) -> dict[str, Any]:
    ids = [d.packet_id for d in log.deliveries]
    seqs = [d.seq for d in log.deliveries]
    seen = set(ids)
    return {
        "name": log.name,
        "subscription": log.subscription,
        "deliveries": len(ids),
        "duplicates": (len(ids) - len(seen)) + sum(1 for i in log.leftover if i in seen),
        "duplicate_seqs": len(seqs) - len(set(seqs)),
        "out_of_order": sum(1 for a, b in zip(seqs, seqs[1:], strict=False) if b <= a),
        "seq_gaps": len(set(range(1, max(seqs, default=0) + 1)) - set(seqs)),
        "losses": len(accepted - seen),
        "unknown": len(seen - accepted) + sum(1 for i in log.leftover if i not in seen),
        "left_after_cursor": len(log.leftover),
        "other_events": log.other_events,
        "cursor": log.cursor,
        "last_seq_seen": max(seqs, default=0),
        "polls": log.polls,
        "acks": log.acks,
        "errors": dict(log.errors),
        "finished": log.finished,
    }


def delivery_latencies(phase: LoadPhase) -> tuple[list[float], list[float]]:
    """(from the first send, from the publisher's 201) for each first delivery of an accepted packet."""
    from_send: list[float] = []
    from_answer: list[float] = []
    for log in phase.logs:
        first: set[str] = set()
        for d in log.deliveries:
            out = phase.state.accepted.get(d.packet_id)
            if out is None or d.packet_id in first:
                continue
            first.add(d.packet_id)
            from_send.append(d.received - out.first_sent)
            from_answer.append(d.received - out.answered)
    return from_send, from_answer


def publish_summary(phase: LoadPhase, cfg: LoadConfig) -> dict[str, Any]:
    outcomes = phase.state.outcomes
    accepted = [o for o in outcomes if o.accepted]
    refused = Counter(f"{o.status} {o.code or o.record_status}".strip() for o in outcomes if not o.accepted)
    last = max((o.answered for o in accepted), default=phase.started)
    seconds = max(last - phase.started, 1e-9)
    nbytes = sum(o.size for o in accepted)
    return {
        "attempted": len(outcomes),
        "not_attempted": cfg.publishers * cfg.packets - len(outcomes),
        "accepted": len(accepted),
        "created": sum(1 for o in accepted if o.status == 201),
        "refused": dict(refused),
        "requests": sum(o.attempts for o in outcomes),
        "retries": sum(len(o.retried) for o in outcomes),
        "retried_on": dict(Counter(r for o in outcomes for r in o.retried)),
        "retry_wait_seconds": sum(sum(o.retry_waits) for o in outcomes),
        "bytes": nbytes,
        "mean_packet_bytes": nbytes / len(accepted) if accepted else 0,
        "seconds": seconds,
        "packets_per_s": len(accepted) / seconds,
        "mb_per_s": nbytes / 1e6 / seconds,
        "request_latency_ms": percentiles([s for o in outcomes for s in o.request_seconds]),
        "packet_latency_ms": percentiles([o.answered - o.first_sent for o in accepted]),
    }


def build_report(
    cfg: LoadConfig,
    phase: LoadPhase,
    ref: Reference,
    rss: RSSSampler,
    cpu: CPUTimes,
    topic: str,
    problems: list[str],
    command: str,
) -> dict[str, Any]:
    accepted = set(phase.state.accepted)
    subscribers = [subscriber_summary(log, accepted) for log in phase.logs]
    publish = publish_summary(phase, cfg)
    from_send, from_answer = delivery_latencies(phase)
    ref_rate = ref.count / ref.seconds if ref.seconds else 0.0
    totals = {k: sum(s[k] for s in subscribers) for k in ("deliveries", "duplicates", "losses", "unknown")}
    return {
        "command": command,
        "environment": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "broker_env": cfg.broker_env(),
            "loadavg_before": list(phase.loadavg[0]),
            "loadavg_after": list(phase.loadavg[1]),
        },
        "settings": {**asdict(cfg), "topic": topic, "database_url": None},
        "complete": phase.complete,
        "cut_short": phase.cut_short,
        "elapsed_s": phase.ended - phase.started,
        "publish_phase_s": phase.publish_ended - phase.started,
        "publish": publish,
        "reference": {
            "name": "raw S3 put_object (boto3), same bytes, same concurrency",
            "count": ref.count,
            "bytes": ref.size,
            "seconds": ref.seconds,
            "packets_per_s": ref_rate,
            "mb_per_s": ref.size / 1e6 / ref.seconds if ref.seconds else 0.0,
            "latency_ms": percentiles(ref.put_seconds),
        },
        "throughput_vs_raw_s3": publish["packets_per_s"] / ref_rate if ref_rate else None,
        "delivery": {
            "expected": len(accepted) * len(subscribers),
            **totals,
            "max_duplicates_per_subscriber": max((s["duplicates"] for s in subscribers), default=0),
            "max_losses_per_subscriber": max((s["losses"] for s in subscribers), default=0),
            "latency_from_send_ms": percentiles(from_send),
            "latency_from_201_ms": percentiles(from_answer),
            "fetch_latency_ms": percentiles([s for log in phase.logs for s in log.fetch_seconds]),
            "subscribers": subscribers,
        },
        "broker_rss_mib": {
            "before": rss.baseline / MiB,
            "peak": rss.peak / MiB,
            "after": rss.final / MiB,
            "samples": rss.samples,
        },
        "cpu_seconds": cpu.used,
        "broker_log_problems": problems[:50],
    }


def failures(report: dict[str, Any]) -> list[str]:
    """Why the run failed, if it did: losses, duplicates, unknown deliveries, refusals, the deadline."""
    d, p = report["delivery"], report["publish"]
    out = []
    if d["losses"]:
        out.append(f"{d['losses']} lost deliveries")
    if d["duplicates"]:
        out.append(f"{d['duplicates']} duplicate deliveries")
    if d["unknown"]:
        out.append(f"{d['unknown']} deliveries of packets no publisher saw accepted")
    if p["refused"] or p["not_attempted"]:
        out.append(f"publishes not accepted: {p['refused'] or {}} (+{p['not_attempted']} not attempted)")
    if not report["complete"]:
        out.append("incomplete: " + "; ".join(report["cut_short"]))
    return out


def _ms(v: float | int | None) -> str:
    return "—" if v is None else f"{v:,.1f}"


def latency_row(name: str, p: dict[str, Any]) -> str:
    cells = " | ".join(f"{_ms(p[k]):>8}" for k in ("p50", "p95", "p99", "max"))
    return f"| {name:<46} | {p['n']:>6} | {cells} |"


def render(report: dict[str, Any]) -> str:
    """The Markdown report: counts, throughput against raw S3, latencies, broker RSS and CPU, per subscriber."""
    s, p, d, ref = report["settings"], report["publish"], report["delivery"], report["reference"]
    env, rss, cpu = report["environment"], report["broker_rss_mib"], report["cpu_seconds"]
    verdict = failures(report)
    limits = ", ".join(f"{k}={v}" for k, v in env["broker_env"].items()) or "broker defaults"
    lines = [
        "# Load run",
        "",
        f"`{report['command']}`",
        "",
        f"{s['publishers']} publishers × {s['packets']} packets → one topic (`{s['topic']}`), "
        f"{s['subscribers']} subscriber{'s' if s['subscribers'] != 1 else ''} "
        f"(long-poll + ack{', fetch + verify' if s['fetch'] else ''}); "
        f"broker process on Postgres + nanio (loopback); {env['cpus']} CPU(s); upload limits: {limits}; "
        f"packets {p['mean_packet_bytes']:,.0f} bytes on average; deadline {s['timeout']:g} s, "
        f"run {'complete' if report['complete'] else 'INCOMPLETE'} in {report['elapsed_s']:.1f} s; "
        f"machine load average (1 min) {env['loadavg_before'][0]:.1f} before, {env['loadavg_after'][0]:.1f} after "
        "(anything else running shares the cores: see 'other' CPU below).",
        "",
        f"**{'PASS' if not verdict else 'FAIL'}** — {d['losses']} lost, "
        f"{d['max_duplicates_per_subscriber']} duplicated per subscriber cursor (max; {d['duplicates']} in all), "
        f"{d['unknown']} unknown" + (f"; {'; '.join(verdict)}" if verdict else ""),
        "",
        f"| {'count':<46} | {'value':>32} |",
        f"|{'-' * 48}|{'-' * 34}|",
    ]
    refused = ", ".join(f"{k}: {v}" for k, v in p["refused"].items()) or "0"
    retried = ", ".join(f"{k}: {v}" for k, v in p["retried_on"].items())
    counts = [
        ("publishers × packets (attempted)", f"{s['publishers']} × {s['packets']} ({p['attempted']})"),
        ("accepted (201 / 200)", f"{p['accepted']} ({p['created']} / {p['accepted'] - p['created']})"),
        ("refused (status code)", refused),
        ("not attempted (deadline)", str(p["not_attempted"])),
        ("publish requests / retries", f"{p['requests']} / {p['retries']}" + (f" ({retried})" if retried else "")),
        ("subscribers", str(s["subscribers"])),
        ("deliveries / expected (accepted × subscribers)", f"{d['deliveries']} / {d['expected']}"),
        ("duplicates per subscriber (max / total)", f"{d['max_duplicates_per_subscriber']} / {d['duplicates']}"),
        ("losses per subscriber (max / total)", f"{d['max_losses_per_subscriber']} / {d['losses']}"),
        ("unknown deliveries", str(d["unknown"])),
    ]
    lines += [f"| {k:<46} | {v:>32} |" for k, v in counts]
    ratio = report["throughput_vs_raw_s3"]
    lines += [
        "",
        f"| {'throughput':<46} | {'packets':>7} | {'seconds':>7} | {'packets/s':>9} | {'MB/s':>6} | {'× raw S3':>8} |",
        f"|{'-' * 48}|{'-' * 9}|{'-' * 9}|{'-' * 11}|{'-' * 8}|{'-' * 10}|",
        f"| {'publish via broker (POST, all at once)':<46} | {p['accepted']:>7} | {p['seconds']:>7.2f} "
        f"| {p['packets_per_s']:>9,.1f} | {p['mb_per_s']:>6.2f} | {_ratio(ratio):>8} |",
        f"| {'raw S3 put_object, boto3 (reference)':<46} | {ref['count']:>7} | {ref['seconds']:>7.2f} "
        f"| {ref['packets_per_s']:>9,.1f} | {ref['mb_per_s']:>6.2f} | {'1.00':>8} |",
        "",
        f"| {'latency (ms)':<46} | {'n':>6} | {'p50':>8} | {'p95':>8} | {'p99':>8} | {'max':>8} |",
        f"|{'-' * 48}|{'-' * 8}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|",
        latency_row("publish request (POST → answer)", p["request_latency_ms"]),
        latency_row("publish, first send → accepted (with retries)", p["packet_latency_ms"]),
        latency_row("raw S3 put_object (reference)", ref["latency_ms"]),
        latency_row("publish → delivery (from the first send)", d["latency_from_send_ms"]),
        latency_row("publish → delivery (from the publisher's 201)", d["latency_from_201_ms"]),
    ]
    if d["fetch_latency_ms"]["n"]:
        lines.append(latency_row("fetch + verify one delivered packet", d["fetch_latency_ms"]))
    lines += [
        "",
        f"| {'broker RSS (MiB)':<46} | {'before':>8} | {'peak':>8} | {'after':>8} | {'samples':>8} |",
        f"|{'-' * 48}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|",
        f"| {'during the load':<46} | {rss['before']:>8.1f} | {rss['peak']:>8.1f} | {rss['after']:>8.1f} "
        f"| {rss['samples']:>8} |",
        "",
        f"| {'CPU seconds during the load':<46} |  client |  broker |   nanio | postgres | machine |   other |",
        f"|{'-' * 48}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 10}|{'-' * 9}|{'-' * 9}|",
        f"| {'(postgres: its backends for this database)':<46} | "
        + " | ".join(f"{cpu.get(n, 0.0):>7.2f}" for n in ("client", "broker", "nanio"))
        + f" | {cpu.get('postgres', 0.0):>8.2f} | {cpu['machine']:>7.2f} | {other_cpu(cpu):>7.2f} |",
        "",
        "| subscriber | deliveries | duplicates | losses | unknown | left after cursor | cursor | polls | acks "
        "| errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sub in d["subscribers"]:
        errors = ", ".join(f"{k}: {v}" for k, v in sub["errors"].items()) or "0"
        lines.append(
            f"| {sub['subscription']} | {sub['deliveries']} | {sub['duplicates']} | {sub['losses']} | {sub['unknown']} "
            f"| {sub['left_after_cursor']} | {sub['cursor']} | {sub['polls']} | {sub['acks']} | {errors} |"
        )
    problems = report["broker_log_problems"]
    lines += ["", f"broker log: {len(problems)} line(s) look like errors" if problems else "broker log: no errors"]
    lines += [f"    {ln}" for ln in problems[:20]]
    return "\n".join(lines) + "\n"


def other_cpu(cpu: dict[str, float]) -> float:
    """The machine's CPU seconds not used by the run's own processes (other work sharing the cores)."""
    return cpu["machine"] - sum(cpu.get(n, 0.0) for n in ("client", "broker", "nanio", "postgres"))


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


# ----------------------------------------------------------------------------- entry points


def run_load(cfg: LoadConfig, *, command: str, work_dir: Path | None = None) -> dict[str, Any]:
    """The whole run on a fresh stack; returns the report (see ``build_report``)."""
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="m2kt-load-") as tmp_name:
        tmp = Path(tmp_name)
        broker_log = tmp / "broker.log"
        try:
            with broker_stack(tmp, cfg.database_url, broker_log, extra_env=cfg.broker_env()) as stack:
                report = run_on_stack(stack, cfg, tmp, command)
        except BaseException:
            if broker_log.exists():  # the log dies with the temp dir: show its end
                tail = broker_log.read_text(errors="replace").splitlines()[-40:]
                print("broker log (last lines):\n" + "\n".join("    " + ln for ln in tail), file=sys.stderr)
            raise
        report["broker_log_problems"] = log_problems(broker_log)[:50]
    return report


def run_on_stack(stack: BrokerStack, cfg: LoadConfig, tmp: Path, command: str) -> dict[str, Any]:
    base = stack.broker.url
    topic = f"bench.load-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {stack.admin_token}"}, timeout=60) as admin:
        publishers = [register(admin, "teacher", True) for _ in range(cfg.publishers)]
        subscribers = [register(admin, "student", False) for _ in range(cfg.subscribers)]
    (tmp / "packets").mkdir()
    build_packets(tmp / "packets", publishers, topic, cfg.packets, cfg.size_kib)
    for i in range(cfg.subscribers):
        (tmp / f"inbox-{i}").mkdir()
    warm_up(base, publishers[0], subscribers[0], topic + "-warm", tmp / "packets")
    subscribe_all(base, subscribers, topic)
    print(f"… {cfg.publishers * cfg.packets} packets built; raw S3 reference", file=sys.stderr)
    ref = raw_s3_reference(stack, publishers)
    print("… load", file=sys.stderr)
    database = stack.broker.env["M2KT_DATABASE_URL"].rsplit("/", 1)[1]
    with (
        RSSSampler(stack.broker_pid) as rss,
        CPUTimes(stack.broker_pid, stack.nanio_pid) as cpu,
        PostgresCPU(database) as pg,
    ):
        phase = asyncio.run(load_phase(base, publishers, subscribers, topic, cfg, tmp))
    report = build_report(cfg, phase, ref, rss, cpu, topic, [], command)
    report["cpu_seconds"]["postgres"] = pg.seconds
    return report


def write_outputs(report: dict[str, Any], out: Path) -> str:
    """``load.md`` (the printed tables) and ``load.json`` under ``out``; returns the Markdown."""
    text = render(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.md").write_text(text)
    (out / "load.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return text


def parse_args(argv: list[str] | None) -> tuple[LoadConfig, Path, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--publishers", type=int, default=50, help="publisher nodes (default 50)")
    parser.add_argument("--packets", type=int, default=20, help="packets per publisher (default 20)")
    parser.add_argument("--subscribers", type=int, default=10, help="subscriber nodes (default 10)")
    parser.add_argument("--timeout", type=float, default=300.0, help="hard deadline of the load, seconds (300)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where load.md/.json go")
    parser.add_argument("--database-url", default=os.environ.get("M2KT_TEST_DATABASE_URL", DEFAULT_DATABASE_URL))
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary files go")
    parser.add_argument("--rate-limit", action="store_true", help="keep the broker's upload rate limit (count 429s)")
    parser.add_argument("--upload-rate", type=float, default=None, help="M2KT_UPLOAD_RATE_PER_MINUTE for the broker")
    parser.add_argument("--upload-burst", type=int, default=None, help="M2KT_UPLOAD_BURST for the broker")
    parser.add_argument("--fetch", action="store_true", help="subscribers also download and verify each packet")
    parser.add_argument("--size-kib", type=int, default=0, help="pad each packet to about this many KiB")
    parser.add_argument("--wait", type=float, default=10.0, help="subscribers' long-poll seconds (10)")
    parser.add_argument("--limit", type=int, default=100, help="events per subscription page (100)")
    parser.add_argument("--max-retries", type=int, default=20, help="retries per packet on 429/5xx/no answer")
    a = parser.parse_args(argv)
    if min(a.publishers, a.packets, a.subscribers) < 1:
        parser.error("--publishers, --packets and --subscribers must be at least 1")
    cfg = LoadConfig(
        publishers=a.publishers,
        packets=a.packets,
        subscribers=a.subscribers,
        timeout=a.timeout,
        database_url=a.database_url,
        rate_limit=a.rate_limit,
        upload_rate=a.upload_rate,
        upload_burst=a.upload_burst,
        fetch=a.fetch,
        size_kib=a.size_kib,
        wait=a.wait,
        limit=a.limit,
        max_retries=a.max_retries,
    )
    return cfg, a.out, a.dir


def main(argv: list[str] | None = None) -> int:
    cfg, out, work_dir = parse_args(argv)
    command = "python -m benchmarks.load " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = run_load(cfg, command=command, work_dir=work_dir)
    print("\n" + write_outputs(report, out))
    problems = failures(report)
    if problems:
        print("FAIL: " + "; ".join(problems), file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
