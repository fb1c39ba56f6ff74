"""Broker speed next to raw S3, in one run: small packets (rate) and large ones (throughput).

    m2kt bench speed                                   # 2 KB ×200 sequential and 8-way; 1, 16, 128 MiB; 3 runs
    m2kt bench speed --sizes 1,16 --runs 5 --workers 2 --out /tmp/speed

Real processes on loopback: nanio (file-backed S3), a fresh PostgreSQL database and ``m2kt broker serve``
(``--workers``), the same bucket for the raw reference and the broker. What is timed:

* **small packets** (~2 KB, every one distinct): ``BrokerClient.publish`` (the broker parses, checks the
  key and signature, hashes, stores and commits) one after another, and from 8 threads at once (a client
  each), next to raw boto3 ``put_object`` of the same bytes, sequential and 8-way;
* **large packets** (each timed publish a packet of its own, written before the clock starts):
  ``publish`` vs ``upload_file``; ``fetch`` with a presigned redirect and through the broker (both verify
  digest, signature and finiteness on the client) vs ``download_file``; the broker's peak RSS growth.

Every figure is the median of ``--runs`` runs with its spread (min–max); ratios are raw time / broker time
per run, then the median of those — never the best run. A re-published identical packet is a no-op on the
broker's side, so no timed publish repeats one. MLflow is not installed here; there is no MLflow column.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from m2kt import BrokerClient
from m2kt.benchmarks.broker_memory import MiB, RSSSampler, prefault, write_big_packet
from m2kt.benchmarks.harness.brokers import Node, register_node
from m2kt.benchmarks.harness.packets import make_body, make_tensors
from m2kt.benchmarks.harness.services import DEFAULT_DATABASE_URL
from m2kt.benchmarks.harness.stack import BrokerStack, broker_stack
from m2kt.format import write_packet
from m2kt.format.keys import SigningKey

__all__ = ["Series", "main", "run"]


@dataclass
class Series:
    """One measured quantity over the runs (per-run values, higher is better), and its raw reference."""

    section: str
    operation: str
    unit: str  # "packets/s" or "MB/s"
    values: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)  # the reference's value in the same run
    rss_growth: list[int] = field(default_factory=list)
    target: float | None = None  # the ratio the issue asks for

    def summary(self) -> dict[str, Any]:
        ratios = [v / r for v, r in zip(self.values, self.raw, strict=True)] if self.raw else []
        return {
            "section": self.section,
            "operation": self.operation,
            "unit": self.unit,
            "values": self.values,
            "raw": self.raw,
            "median": statistics.median(self.values),
            "min": min(self.values),
            "max": max(self.values),
            "raw_median": statistics.median(self.raw) if self.raw else None,
            "ratios": ratios,
            "ratio_median": statistics.median(ratios) if ratios else None,
            "ratio_min": min(ratios) if ratios else None,
            "ratio_max": max(ratios) if ratios else None,
            "rss_growth_max_mib": max(self.rss_growth) / MiB if self.rss_growth else None,
            "target": self.target,
        }


def small_packets(directory: Path, key: SigningKey, topic: str, n: int, tag: str) -> list[Path]:
    """``n`` distinct ~2 KB packets (their tensors and creation times differ)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = directory / f"{tag}-{i}.m2kt"
        body = make_body(topic=topic, created_at=datetime.now(UTC))
        write_packet(path, body, make_tensors(k=4, d=8, seed=hash((tag, i)) % (1 << 31)), key)
        paths.append(path)
    return paths


def _raw_put(stack: BrokerStack) -> Callable[[str, bytes], None]:
    def put(key: str, body: bytes) -> None:
        stack.s3c.put_object(Bucket=stack.bucket, Key=key, Body=body)

    return put


def _each(fn: Callable[..., object], calls: Sequence[tuple[Any, ...]]) -> None:
    for args in calls:
        fn(*args)


def _in_threads(jobs: Sequence[Callable[[], None]], threads: int) -> None:
    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()


def measure_small(
    stack: BrokerStack,
    publishers: Sequence[Node],
    tmp: Path,
    n: int,
    threads: int,
    runs: int,
    log: Callable[[str], None],
) -> list[Series]:
    seq = Series("small", "publish ~2 KB, sequential (SDK) vs raw put_object", "packets/s", target=0.5)
    par = Series(
        "small", f"publish ~2 KB, {threads} at once (SDK) vs raw put_object ×{threads}", "packets/s", target=0.5
    )
    # one node per publisher, as eight teachers would be (one node's uploads in progress are capped)
    clients = [BrokerClient(stack.broker.url, node.token, quiet=True) for node in publishers]
    keys = [node.key for node in publishers]
    topic = f"bench.small-{uuid.uuid4().hex[:6]}"
    try:
        for t, client in enumerate(clients):  # connections, caches, the topic row
            for warm in small_packets(tmp / "warm", keys[t], topic, 5, f"warm{t}"):
                client.publish(warm, topic)
        for run in range(runs):
            # packet i is signed by the key of the publisher that sends it (sequential: publisher 0)
            signer = [0] * n + [(i - n) % threads for i in range(n, 2 * n)]
            paths = [
                small_packets(tmp / f"small-{run}", keys[signer[i]], topic, 1, f"r{run}-{i}")[0] for i in range(2 * n)
            ]
            bodies = [(f"raw-small/{run}-{i}", p.read_bytes()) for i, p in enumerate(paths)]
            put = _raw_put(stack)
            first, second = range(n), range(n, 2 * n)
            with stopwatch() as took:
                for i in first:
                    put(*bodies[i])
            seq.raw.append(n / took[0])
            with stopwatch() as took:
                for i in first:
                    clients[0].publish(paths[i], topic)
            seq.values.append(n / took[0])
            shares = [[i for i in second if signer[i] == t] for t in range(threads)]
            with stopwatch() as took:
                _in_threads([partial(_each, put, [bodies[i] for i in share]) for share in shares], threads)
            par.raw.append(n / took[0])
            with stopwatch() as took:
                jobs = [
                    partial(_each, partial(client.publish, topic=topic), [(paths[i],) for i in share])
                    for share, client in zip(shares, clients, strict=True)
                ]
                _in_threads(jobs, threads)
            par.values.append(n / took[0])
            log(
                f"  small run {run + 1}: sequential {seq.values[-1]:.0f}/s (raw {seq.raw[-1]:.0f}/s), "
                f"{threads}-way {par.values[-1]:.0f}/s (raw {par.raw[-1]:.0f}/s)"
            )
            for p in paths:
                p.unlink()
    finally:
        for c in clients:
            c.close()
    return [seq, par]


def measure_large(
    stack: BrokerStack,
    key: SigningKey,
    publisher: BrokerClient,
    redirected: BrokerClient,
    streamed: BrokerClient,
    tmp: Path,
    size_mib: int,
    runs: int,
    log: Callable[[str], None],
) -> list[Series]:
    section = f"{size_mib} MiB"
    up = Series(section, "publish (SDK) vs raw upload_file", "MB/s", target=0.9)
    redirect = Series(section, "fetch, presigned redirect (SDK, verified) vs raw download_file", "MB/s", target=0.9)
    through = Series(section, "fetch through the broker (SDK, verified) vs raw download_file", "MB/s", target=0.8)
    topic = f"bench.large-{uuid.uuid4().hex[:6]}"
    s3c, bucket = stack.s3c, stack.bucket
    pid = stack.broker_pid  # with --workers, the sampler adds up the worker processes
    for run in range(runs):
        path = tmp / f"large-{size_mib}-{run}.m2kt"
        write_big_packet(path, tmp / "scratch", size_mib * MiB, topic, key, seed=run + 1)  # distinct per run
        mb = path.stat().st_size / 1e6
        raw_key = f"raw-large/{uuid.uuid4().hex}"
        prefault(2 * path.stat().st_size)
        with stopwatch() as took:
            s3c.upload_file(str(path), bucket, raw_key)
        up.raw.append(mb / took[0])
        with RSSSampler(pid) as rss, stopwatch() as took:
            packet_id = publisher.publish(path, topic).id
        up.values.append(mb / took[0])
        up.rss_growth.append(rss.growth)
        down = tmp / "raw.down"
        with stopwatch() as took:
            s3c.download_file(bucket, raw_key, str(down))
        raw_down = mb / took[0]
        down.unlink()
        for series, client, into in ((redirect, redirected, "in-redirect"), (through, streamed, "in-stream")):
            series.raw.append(raw_down)
            target = tmp / into
            with RSSSampler(pid) as rss, stopwatch() as took:
                client.fetch(packet_id, f"{target}/")
            series.values.append(mb / took[0])
            series.rss_growth.append(rss.growth)
            for f in target.iterdir():
                f.unlink()
        s3c.delete_object(Bucket=bucket, Key=raw_key)
        path.unlink()
        log(
            f"  {section} run {run + 1}: publish {up.values[-1]:.0f} MB/s (raw {up.raw[-1]:.0f}), redirect "
            f"{redirect.values[-1]:.0f} MB/s, through {through.values[-1]:.0f} MB/s (raw {raw_down:.0f})"
        )
    return [up, redirect, through]


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """``with stopwatch() as took:`` … then ``took[0]`` is the block's wall time in seconds."""
    took: list[float] = []
    t0 = time.perf_counter()
    yield took
    took.append(time.perf_counter() - t0)


def run(
    *,
    sizes: Sequence[int],
    small: int,
    threads: int,
    runs: int,
    workers: int,
    database_url: str,
    command: str = "m2kt bench speed",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Start the stack, measure everything, return the JSON document."""
    started = time.perf_counter()
    series: list[Series] = []
    with tempfile.TemporaryDirectory(prefix="m2kt-speed-") as tmp_name:
        tmp = Path(tmp_name)
        env = {"M2KT_UPLOAD_RATE_PER_MINUTE": "0"}  # the benchmark measures speed, not the rate limit
        with broker_stack(tmp, database_url, tmp / "broker.log", extra_env=env, workers=workers) as stack:
            teachers = [register_node(stack.broker.url, stack.admin_token, "teacher") for _ in range(max(1, threads))]
            teacher = teachers[0]
            student = register_node(stack.broker.url, stack.admin_token, "student", with_key=False)
            assert teacher.key is not None
            if small:
                series += measure_small(stack, teachers, tmp, small, threads, runs, log)
            publisher = BrokerClient(stack.broker.url, teacher.token, quiet=True)
            redirected = BrokerClient(stack.broker.url, student.token, quiet=True, prefer_redirect=True)
            streamed = BrokerClient(stack.broker.url, student.token, quiet=True, prefer_redirect=False)
            try:
                for size in sizes:
                    series += measure_large(stack, teacher.key, publisher, redirected, streamed, tmp, size, runs, log)
            finally:
                for c in (publisher, redirected, streamed):
                    c.close()
    return {
        "command": command,
        "settings": {"sizes_mib": list(sizes), "small": small, "threads": threads, "runs": runs, "workers": workers},
        "environment": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "seconds": time.perf_counter() - started,
        },
        "series": [s.summary() for s in series],
    }


def markdown(document: dict[str, Any]) -> str:
    s, env = document["settings"], document["environment"]
    lines = [
        "# Broker speed",
        "",
        f"`{document['command']}`",
        "",
        f"Median of {s['runs']} runs (min–max in brackets); ratio = raw time / broker time in the same run, "
        f"median over runs. Broker: `m2kt broker serve --workers {s['workers']}` on PostgreSQL + nanio (loopback), "
        f"{env['cpus']} CPU(s); {env['seconds']:.0f} s in all. Small packets: {s['small']} per run and mode, every one "
        "distinct; large: a distinct packet per run.",
        "",
        "| section | operation | broker | raw | ratio | target | broker RSS growth |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in document["series"]:
        ratio = row["ratio_median"]
        verdict = "" if row["target"] is None else (" ✓" if ratio >= row["target"] else " ✗")
        rss = f"{row['rss_growth_max_mib']:.0f} MiB" if row["rss_growth_max_mib"] is not None else "—"
        lines.append(
            f"| {row['section']} | {row['operation']} | {row['median']:,.0f} {row['unit']} "
            f"[{row['min']:,.0f}–{row['max']:,.0f}] | {row['raw_median']:,.0f} {row['unit']} | "
            f"{ratio:.2f}× [{row['ratio_min']:.2f}–{row['ratio_max']:.2f}] | "
            f"≥ {row['target']:.1f}×{verdict} | {rss} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="m2kt bench speed", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,16,128", help="large packet sizes in MiB, comma-separated ('' for none)")
    parser.add_argument("--small", type=int, default=200, help="small packets per run and mode (0: skip)")
    parser.add_argument("--threads", type=int, default=8, help="concurrent publishers for the small packets")
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement (median and spread)")
    parser.add_argument("--workers", type=int, default=1, help="m2kt broker serve --workers")
    parser.add_argument("--out", type=Path, default=None, help="write broker_speed.md and .json here")
    parser.add_argument("--database-url", default=os.environ.get("M2KT_TEST_DATABASE_URL", DEFAULT_DATABASE_URL))
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    if args.runs < 1 or args.small < 0 or args.threads < 1:
        parser.error("--runs and --threads must be >= 1, --small >= 0")
    document = run(
        sizes=sizes,
        small=args.small,
        threads=args.threads,
        runs=args.runs,
        workers=args.workers,
        database_url=args.database_url,
        command=" ".join(["m2kt bench speed", *(sys.argv[1:] if argv is None else argv)]),
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    table = markdown(document)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "broker_speed.md").write_text(table)
        (args.out / "broker_speed.json").write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
