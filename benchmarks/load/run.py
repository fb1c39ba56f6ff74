"""Load: N concurrent publishers and M subscribers on one topic, bounded in count and in time.

    python -m m2kt.benchmarks.load --publishers 50 --packets 20 --subscribers 10
    python -m m2kt.benchmarks.load --publishers 4 --packets 3 --subscribers 2 --timeout 60 --out /tmp/load

Real processes on loopback (m2kt.benchmarks.harness.stack): nanio (file-backed S3), a throw-away PostgreSQL
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
import json
import os
import shlex
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil

from m2kt.benchmarks.broker_memory import CPUTimes, RSSSampler, log_problems
from m2kt.benchmarks.harness.services import DEFAULT_DATABASE_URL
from m2kt.benchmarks.harness.stack import BrokerStack, broker_stack
from m2kt.benchmarks.load.parties import LoadConfig, Party, build_packets, packet, register
from m2kt.benchmarks.load.publish import RunState, run_publisher
from m2kt.benchmarks.load.report import LoadPhase, Reference, build_report, cpu_budget, failures, render
from m2kt.benchmarks.load.subscribe import SubscriberLog, leftovers, run_subscriber

# ----------------------------------------------------------------------------- the run


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


# ----------------------------------------------------------------------------- entry points


def run_load(cfg: LoadConfig, *, command: str, work_dir: Path | None = None) -> dict[str, Any]:
    """The whole run on a fresh stack; returns the report (see ``build_report``)."""
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="m2kt-load-") as tmp_name:
        tmp = Path(tmp_name)
        broker_log = tmp / "broker.log"
        try:
            with broker_stack(
                tmp, cfg.database_url, broker_log, extra_env=cfg.broker_env(), workers=cfg.workers
            ) as stack:
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
    report["cpu_budget"] = cpu_budget(report)
    return report


def write_outputs(report: dict[str, Any], out: Path) -> str:
    """``load.md`` (the printed tables) and ``load.json`` under ``out``; returns the Markdown."""
    text = render(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.md").write_text(text)
    (out / "load.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return text


def parse_args(argv: list[str] | None) -> tuple[LoadConfig, Path, Path | None]:
    parser = argparse.ArgumentParser(
        prog="python -m m2kt.benchmarks.load", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    parser.add_argument("--workers", type=int, default=1, help="m2kt broker serve --workers (default 1)")
    parser.add_argument(
        "--inline-blob-max-bytes",
        type=int,
        default=0,
        help="M2KT_INLINE_BLOB_MAX_BYTES for the broker: packets up to this size kept in its database (0: off)",
    )
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
        workers=a.workers,
        inline_blob_max_bytes=a.inline_blob_max_bytes,
    )
    return cfg, a.out, a.dir


def main(argv: list[str] | None = None) -> int:
    cfg, out, work_dir = parse_args(argv)
    command = "python -m m2kt.benchmarks.load " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = run_load(cfg, command=command, work_dir=work_dir)
    print("\n" + write_outputs(report, out))
    problems = failures(report)
    if problems:
        print("FAIL: " + "; ".join(problems), file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
