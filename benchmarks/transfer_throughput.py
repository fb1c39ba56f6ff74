"""Publish and fetch through the broker and the SDK, next to raw boto3 on the same S3 server.

    python -m m2kt.benchmarks.transfer_throughput                    # 1, 16, 128, 512 MiB
    python -m m2kt.benchmarks.transfer_throughput --sizes 1 16 --repeat 3

Real processes on loopback: nanio (file-backed S3), a fresh PostgreSQL database, and
``m2kt broker serve``. For each size, in the same run and against the same bucket:

* raw ``boto3`` ``upload_file`` / ``download_file`` (default TransferConfig) — the reference;
* ``BrokerClient.publish`` (streamed upload; the broker validates while it stores);
* ``BrokerClient.fetch`` with ``prefer_redirect`` (307 to a presigned URL: bytes bypass the
  broker) and without (streamed through the broker); both verify id, digest and signature
  on the client before the file is moved into place.

Prints MB/s, the ratio to raw, and the broker's peak resident-memory growth per operation.
Targets (issue 4): upload ≥ 0.8× raw, download with redirect ≥ 0.9× raw.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from m2kt import BrokerClient, SigningKey
from m2kt.benchmarks.broker_memory import MiB, RSSSampler, write_big_packet
from m2kt.benchmarks.harness.brokers import register_node
from m2kt.benchmarks.harness.services import DEFAULT_DATABASE_URL
from m2kt.benchmarks.harness.stack import broker_stack


def timed(fn: Callable[[], object], repeat: int, sampler_pid: int | None = None) -> tuple[float, int]:
    """Best wall time of ``repeat`` runs, and the largest broker RSS growth seen."""
    best, growth = float("inf"), 0
    for _ in range(repeat):
        if sampler_pid is None:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
            continue
        with RSSSampler(sampler_pid) as rss:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        growth = max(growth, rss.growth)
    return best, growth


def measure(
    size_mib: int,
    tmp: Path,
    topic: str,
    key: SigningKey,
    s3c: Any,
    bucket: str,
    broker_pid: int,
    repeat: int,
    publisher: BrokerClient,
    redirected: BrokerClient,
    streamed: BrokerClient,
) -> list[tuple[int, str, float, float, int]]:
    """One size: raw boto3 up/down, then publish and both kinds of fetch through the broker."""
    path = tmp / f"p{size_mib}.m2kt"
    write_big_packet(path, tmp / "scratch", size_mib * MiB, topic, key)
    mb = path.stat().st_size / 1e6
    raw_key = f"raw/{uuid.uuid4().hex}"
    t_raw_up, _ = timed(lambda: s3c.upload_file(str(path), bucket, raw_key), repeat)
    t_raw_down, _ = timed(lambda: s3c.download_file(bucket, raw_key, str(tmp / "raw.down")), repeat)
    # Publishing the same bytes again returns the stored record, so each timed publish gets a
    # packet of its own (another signed copy of the same size).
    copies = [path] + [tmp / f"p{size_mib}-{i}.m2kt" for i in range(1, repeat)]
    for extra in copies[1:]:
        write_big_packet(extra, tmp / "scratch", size_mib * MiB, topic, key)
    ids: list[str] = []
    pending = list(copies)
    t_up, g_up = timed(lambda: ids.append(publisher.publish(pending.pop(0), topic).id), repeat, broker_pid)

    def fetch(client: BrokerClient, into: str) -> None:
        out = tmp / into
        if out.exists():
            for f in out.iterdir():
                f.unlink()
        client.fetch(ids[0], f"{out}/")

    t_redirect, g_redirect = timed(lambda: fetch(redirected, "in-redirect"), repeat, broker_pid)
    t_stream, g_stream = timed(lambda: fetch(streamed, "in-stream"), repeat, broker_pid)
    for copy in copies:
        copy.unlink()
    return [
        (size_mib, "raw boto3 upload_file", mb / t_raw_up, 1.0, 0),
        (size_mib, "publish via broker (SDK)", mb / t_up, t_raw_up / t_up, g_up),
        (size_mib, "raw boto3 download_file", mb / t_raw_down, 1.0, 0),
        (size_mib, "fetch, presigned redirect (SDK, verified)", mb / t_redirect, t_raw_down / t_redirect, g_redirect),
        (size_mib, "fetch through broker (SDK, verified)", mb / t_stream, t_raw_down / t_stream, g_stream),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 16, 128, 512], help="packet sizes in MiB")
    parser.add_argument("--repeat", type=int, default=2, help="best of N per measurement")
    parser.add_argument("--database-url", default=os.environ.get("M2KT_TEST_DATABASE_URL", DEFAULT_DATABASE_URL))
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()

    rows: list[tuple[int, str, float, float, int]] = []  # size, operation, MB/s, ratio, rss growth
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="m2kt-xfer-") as tmp_name:
        tmp = Path(tmp_name)
        with broker_stack(tmp, args.database_url, tmp / "broker.log") as stack:
            broker, s3c, bucket, admin = stack.broker, stack.s3c, stack.bucket, stack.admin_token
            assert broker.proc is not None
            teacher = register_node(broker.url, admin, "teacher")
            student = register_node(broker.url, admin, "student", with_key=False)
            assert teacher.key is not None
            publisher = BrokerClient(broker.url, teacher.token, quiet=True)
            redirected = BrokerClient(broker.url, student.token, quiet=True, prefer_redirect=True)
            streamed = BrokerClient(broker.url, student.token, quiet=True, prefer_redirect=False)
            topic = f"bench.xfer-{uuid.uuid4().hex[:6]}"
            warm = tmp / "warm.m2kt"
            write_big_packet(warm, tmp / "warm.scratch", MiB, topic, teacher.key)
            redirected.fetch(publisher.publish(warm, topic).id, tmp / "warm-in/")

            for size_mib in args.sizes:
                rows += measure(
                    size_mib,
                    tmp,
                    topic,
                    teacher.key,
                    s3c,
                    bucket,
                    broker.proc.pid,
                    args.repeat,
                    publisher,
                    redirected,
                    streamed,
                )
                print(f"… {size_mib} MiB done", file=sys.stderr)
            for c in (publisher, redirected, streamed):
                c.close()

    print(f"\nbest of {args.repeat}; broker process on Postgres + nanio (loopback); {os.cpu_count()} CPU(s)\n")
    print(f"| {'MiB':>4} | {'operation':<42} | {'MB/s':>7} | {'× raw':>6} | {'broker RSS +MiB':>15} |")
    print(f"|{'-' * 6}|{'-' * 44}|{'-' * 9}|{'-' * 8}|{'-' * 17}|")
    for size_mib, name, speed, ratio, growth in rows:
        rss = f"{growth / MiB:.1f}" if "broker" in name or "SDK" in name else "—"
        print(f"| {size_mib:>4} | {name:<42} | {speed:>7,.0f} | {ratio:>6.2f} | {rss:>15} |")
    for size_mib in args.sizes:
        up = next(r for r in rows if r[0] == size_mib and r[1].startswith("publish"))
        down = next(r for r in rows if r[0] == size_mib and r[1].startswith("fetch, presigned"))
        print(
            f"{size_mib:>4} MiB: upload {up[3]:.2f}× raw ({'meets' if up[3] >= 0.8 else 'below'} 0.8), "
            f"redirect download {down[3]:.2f}× raw ({'meets' if down[3] >= 0.9 else 'below'} 0.9)"
        )


if __name__ == "__main__":
    main()
