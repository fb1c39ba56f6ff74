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
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from m2kt import BrokerClient
from m2kt.benchmarks.broker_memory import MiB, RSSSampler, prefault, write_big_packet
from m2kt.benchmarks.harness.brokers import register_node
from m2kt.benchmarks.harness.packets import make_body, make_tensors
from m2kt.benchmarks.harness.results import write_results
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


class Bench:
    """One broker stack (this code, or a baseline checkout's) and the series measured on it."""

    def __init__(self, label: str, stack: BrokerStack, tmp: Path, threads: int, log: Callable[[str], None]) -> None:
        self.label, self.stack, self.tmp, self.threads, self.log = label, stack, tmp, threads, log
        url, admin = stack.broker.url, stack.admin_token
        # one node per small-packet publisher, as eight teachers would be (one node's uploads in flight are capped)
        self.teachers = [register_node(url, admin, "teacher") for _ in range(max(1, threads))]
        student = register_node(url, admin, "student", with_key=False)
        self.clients = [BrokerClient(url, node.token, quiet=True) for node in self.teachers]
        self.redirected = BrokerClient(url, student.token, quiet=True, prefer_redirect=True)
        self.streamed = BrokerClient(url, student.token, quiet=True, prefer_redirect=False)
        # the same fetches as four ranged streams (download_workers=4): what parallel ranges buy here
        self.redirected_4 = BrokerClient(url, student.token, quiet=True, prefer_redirect=True, download_workers=4)
        self.streamed_4 = BrokerClient(url, student.token, quiet=True, prefer_redirect=False, download_workers=4)
        self.series: dict[str, Series] = {}
        self.topic = f"bench.speed-{uuid.uuid4().hex[:6]}"
        for t, client in enumerate(self.clients):  # connections, caches, the topic row
            for warm in small_packets(tmp / "warm", self._key(t), self.topic, 3, f"warm{label}{t}"):
                client.publish(warm, self.topic)

    def _key(self, t: int) -> SigningKey:
        key = self.teachers[t].key
        assert key is not None
        return key

    def _series(self, section: str, operation: str, unit: str, target: float | None) -> Series:
        return self.series.setdefault(f"{section}|{operation}", Series(section, operation, unit, target=target))

    def close(self) -> None:
        for c in [*self.clients, self.redirected, self.streamed, self.redirected_4, self.streamed_4]:
            c.close()

    def small_run(self, run: int, n: int) -> None:
        """``n`` distinct ~2 KB packets sequentially and ``n`` more from ``threads`` publishers at once, each
        next to raw put_object of the same bytes (the same way)."""
        threads = self.threads
        seq = self._series("small", "publish ~2 KB, sequential (SDK) vs raw put_object", "packets/s", 0.5)
        par = self._series(
            "small", f"publish ~2 KB, {threads} at once (SDK) vs raw put_object ×{threads}", "packets/s", 0.5
        )
        signer = [0] * n + [(i - n) % threads for i in range(n, 2 * n)]  # who signs and sends packet i
        folder = self.tmp / f"small-{self.label}-{run}"
        paths = [small_packets(folder, self._key(signer[i]), self.topic, 1, f"r{run}-{i}")[0] for i in range(2 * n)]
        bodies = [(f"raw-small/{self.label}-{run}-{i}", p.read_bytes()) for i, p in enumerate(paths)]
        put = _raw_put(self.stack)
        first, second = range(n), range(n, 2 * n)
        with stopwatch() as took:
            for i in first:
                put(*bodies[i])
        seq.raw.append(n / took[0])
        with stopwatch() as took:
            for i in first:
                self.clients[0].publish(paths[i], self.topic)
        seq.values.append(n / took[0])
        shares = [[i for i in second if signer[i] == t] for t in range(threads)]
        with stopwatch() as took:
            _in_threads([partial(_each, put, [bodies[i] for i in share]) for share in shares], threads)
        par.raw.append(n / took[0])
        with stopwatch() as took:
            jobs = [
                partial(_each, partial(client.publish, topic=self.topic), [(paths[i],) for i in share])
                for share, client in zip(shares, self.clients, strict=True)
            ]
            _in_threads(jobs, threads)
        par.values.append(n / took[0])
        self.log(
            f"  [{self.label}] small run {run + 1}: sequential {seq.values[-1]:.0f}/s (raw {seq.raw[-1]:.0f}/s), "
            f"{threads}-way {par.values[-1]:.0f}/s (raw {par.raw[-1]:.0f}/s)"
        )
        for p in paths:
            p.unlink()

    def large_run(self, run: int, size_mib: int) -> None:
        """One distinct packet of ``size_mib``: publish vs upload_file, both fetches vs download_file."""
        section = f"{size_mib} MiB"
        up = self._series(section, "publish (SDK) vs raw upload_file", "MB/s", 0.9)
        redirect = self._series(section, "fetch, presigned redirect (SDK, verified) vs raw download_file", "MB/s", 0.9)
        through = self._series(section, "fetch through the broker (SDK, verified) vs raw download_file", "MB/s", 0.8)
        redirect_4 = self._series(section, "fetch, presigned redirect, 4 ranged streams", "MB/s", None)
        through_4 = self._series(section, "fetch through the broker, 4 ranged streams", "MB/s", None)
        s3c, bucket, pid = self.stack.s3c, self.stack.bucket, self.stack.broker_pid
        path = self.tmp / f"large-{self.label}-{size_mib}-{run}.m2kt"
        write_big_packet(path, self.tmp / "scratch", size_mib * MiB, self.topic, self._key(0), seed=run + 1)
        mb = path.stat().st_size / 1e6
        raw_key = f"raw-large/{uuid.uuid4().hex}"
        prefault(2 * path.stat().st_size)
        with stopwatch() as took:
            s3c.upload_file(str(path), bucket, raw_key)
        up.raw.append(mb / took[0])
        with RSSSampler(pid) as rss, stopwatch() as took:
            packet_id = self.clients[0].publish(path, self.topic).id
        up.values.append(mb / took[0])
        up.rss_growth.append(rss.growth)
        down = self.tmp / "raw.down"
        with stopwatch() as took:
            s3c.download_file(bucket, raw_key, str(down))
        raw_down = mb / took[0]
        down.unlink()
        fetches = [
            (redirect, self.redirected, "in-redirect"),
            (through, self.streamed, "in-stream"),
            (redirect_4, self.redirected_4, "in-redirect-4"),
            (through_4, self.streamed_4, "in-stream-4"),
        ]
        shift = run % len(fetches)  # the first fetch after a publish runs slower: each kind takes its turn first
        for series, client, into in fetches[shift:] + fetches[:shift]:
            series.raw.append(raw_down)
            target = self.tmp / into
            with RSSSampler(pid) as rss, stopwatch() as took:
                client.fetch(packet_id, f"{target}/")
            series.values.append(mb / took[0])
            series.rss_growth.append(rss.growth)
            for f in target.iterdir():
                f.unlink()
        s3c.delete_object(Bucket=bucket, Key=raw_key)
        path.unlink()
        self.log(
            f"  [{self.label}] {section} run {run + 1}: publish {up.values[-1]:.0f} MB/s (raw {up.raw[-1]:.0f}), "
            f"redirect {redirect.values[-1]:.0f} MB/s, through {through.values[-1]:.0f} MB/s (raw {raw_down:.0f})"
        )


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
    baseline: Path | None = None,
    broker_env: dict[str, str] | None = None,
    command: str = "m2kt bench speed",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Start the stack (and a baseline's, when given), measure everything, return the JSON document.

    With a baseline the two brokers run side by side, each with its own nanio and database, and every
    measurement alternates between them run by run, so a slow moment of the machine hits both. ``broker_env``:
    more ``M2KT_*`` settings for the current broker only (with a baseline of the same code, a setting's
    before/after)."""
    started = time.perf_counter()
    env = {"M2KT_UPLOAD_RATE_PER_MINUTE": "0"}  # the benchmark measures speed, not the rate limit
    with tempfile.TemporaryDirectory(prefix="m2kt-speed-") as tmp_name, ExitStack() as stacks:
        tmp = Path(tmp_name)
        benches: list[Bench] = []
        for label, code in (("baseline", baseline), ("current", None)):
            if label == "baseline" and code is None:
                continue
            where = tmp / label
            where.mkdir()
            extra = env if label == "baseline" else {**env, **(broker_env or {})}
            stack = stacks.enter_context(
                broker_stack(where, database_url, where / "broker.log", extra_env=extra, workers=workers, code=code)
            )
            bench = Bench(label, stack, where, threads, log)
            stacks.callback(bench.close)
            benches.append(bench)
        for run in range(runs if small else 0):
            for bench in benches:
                bench.small_run(run, small)
        for size in sizes:
            for run in range(runs):
                for bench in benches:
                    bench.large_run(run, size)
    return {
        "command": command,
        "settings": {
            "sizes_mib": list(sizes),
            "small": small,
            "threads": threads,
            "runs": runs,
            "workers": workers,
            "baseline": str(baseline) if baseline else None,
            "broker_env": dict(broker_env or {}),
        },
        "environment": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "seconds": time.perf_counter() - started,
        },
        "series": {bench.label: [s.summary() for s in bench.series.values()] for bench in benches},
    }


def markdown(document: dict[str, Any]) -> str:
    s, env = document["settings"], document["environment"]
    lines = [
        "# Broker speed",
        "",
        f"`{document['command']}`",
        "",
        f"Median of {s['runs']} runs (min–max in brackets); ratio = raw time / broker time in the same run, "
        f"median over runs. Broker: `m2kt broker serve --workers {s['workers']}`{_with_env(s)} on PostgreSQL + nanio "
        "(loopback), "
        f"{env['cpus']} CPU(s); {env['seconds']:.0f} s in all. Small packets: {s['small']} per run and mode, every one "
        "distinct; large: a distinct packet per run.",
        "",
        "| section | operation | broker | raw | ratio | target | broker RSS growth |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in document["series"]["current"]:
        ratio = row["ratio_median"]
        target = "—"
        if row["target"] is not None:
            target = f"≥ {row['target']:.1f}×" + (" ✓" if ratio >= row["target"] else " ✗")
        rss = f"{row['rss_growth_max_mib']:.0f} MiB" if row["rss_growth_max_mib"] is not None else "—"
        lines.append(
            f"| {row['section']} | {row['operation']} | {row['median']:,.0f} {row['unit']} "
            f"[{row['min']:,.0f}–{row['max']:,.0f}] | {row['raw_median']:,.0f} {row['unit']} | "
            f"{ratio:.2f}× [{row['ratio_min']:.2f}–{row['ratio_max']:.2f}] | {target} | {rss} |"
        )
    if "baseline" in document["series"]:
        before = {(r["section"], r["operation"]): r for r in document["series"]["baseline"]}
        lines += [
            "",
            f"Before / after in the same run: the baseline is `{s['baseline']}` (an older checkout, or this code"
            f"{' without the settings above' if s.get('broker_env') else ''}), its broker on a stack of its own; "
            "the two alternate run by run.",
            "",
            "| section | operation | before | after | after / before | before × raw | after × raw |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in document["series"]["current"]:
            old = before.get((row["section"], row["operation"]))
            if old is None:
                continue
            lines.append(
                f"| {row['section']} | {row['operation']} | {old['median']:,.0f} {row['unit']} | "
                f"{row['median']:,.0f} {row['unit']} | {row['median'] / old['median']:.2f}× | "
                f"{old['ratio_median']:.2f}× | {row['ratio_median']:.2f}× |"
            )
    return "\n".join(lines) + "\n"


def _with_env(settings: dict[str, Any]) -> str:
    env = settings.get("broker_env") or {}
    return (" with " + ", ".join(f"`{name}={value}`" for name, value in env.items())) if env else ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="m2kt bench speed", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,16,128", help="large packet sizes in MiB, comma-separated ('' for none)")
    parser.add_argument("--small", type=int, default=200, help="small packets per run and mode (0: skip)")
    parser.add_argument("--threads", type=int, default=8, help="concurrent publishers for the small packets")
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement (median and spread)")
    parser.add_argument("--workers", type=int, default=1, help="m2kt broker serve --workers")
    parser.add_argument("--out", type=Path, default=None, help="write broker_speed.md and .json here")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="a directory holding an older m2kt package (e.g. a git worktree's) to run side by side",
    )
    parser.add_argument(
        "--broker-env",
        action="append",
        default=[],
        metavar="M2KT_NAME=VALUE",
        help="a broker setting for the current broker only (repeatable), e.g. M2KT_INLINE_BLOB_MAX_BYTES=65536",
    )
    parser.add_argument("--database-url", default=os.environ.get("M2KT_TEST_DATABASE_URL", DEFAULT_DATABASE_URL))
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    if args.runs < 1 or args.small < 0 or args.threads < 1:
        parser.error("--runs and --threads must be >= 1, --small >= 0")
    broker_env = dict(item.partition("=")[::2] for item in args.broker_env)
    if any(not name.startswith("M2KT_") or not value for name, value in broker_env.items()):
        parser.error("--broker-env takes M2KT_NAME=VALUE")
    document = run(
        sizes=sizes,
        small=args.small,
        threads=args.threads,
        runs=args.runs,
        workers=args.workers,
        database_url=args.database_url,
        baseline=args.baseline,
        broker_env=broker_env,
        command=" ".join(["m2kt bench speed", *(sys.argv[1:] if argv is None else argv)]),
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    table = markdown(document)
    print(table)
    if args.out is not None:
        write_results(args.out, "broker_speed", table, document)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
