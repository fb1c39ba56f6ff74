"""Broker memory while a big packet streams through it, and its speed next to raw boto3.

    python -m m2kt.benchmarks.broker_memory                       # 512 MiB packet
    python -m m2kt.benchmarks.broker_memory --size-mib 64 --database-url postgresql+psycopg://…/test

Everything runs for real on loopback: nanio (a file-backed S3 server, started here on a free
port with a temporary data dir), a fresh PostgreSQL database (created on the server of
``--database-url``, migrated, dropped afterwards) and ``m2kt broker serve`` as a separate
process. A teacher uploads one packet of about ``--size-mib`` MiB, streamed from disk in 1 MiB
chunks, while a thread samples the broker process's resident set every 20 ms: the upload must
not grow it by anything like the packet's size. The reference, in the same run and against the
same nanio bucket, is boto3's ``upload_file`` / ``download_file`` of the same file; the broker's
download (``GET /v1/packets/{id}/blob``, streamed to a file) must return the same bytes. The CPU
seconds each process used during the two uploads are printed too ("other": the rest of the
machine — anything else running skews the comparison).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import psutil

from m2kt.benchmarks.harness.brokers import register_node
from m2kt.benchmarks.harness.packets import make_body
from m2kt.benchmarks.harness.services import DEFAULT_DATABASE_URL
from m2kt.benchmarks.harness.stack import broker_stack
from m2kt.format import write_packet
from m2kt.format.keys import SigningKey

MiB = 1 << 20
CHUNK = 1 * MiB  # upload chunk read from the file
SAMPLE_SECONDS = 0.020


class RSSSampler:
    """Samples another process's RSS every 20 ms while a block runs (baseline taken on entry); with its
    child processes (a broker's ``--workers``), their sum."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.tree = [self.proc, *self.proc.children(recursive=True)]
        self.samples = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        return sum(p.memory_info().rss for p in self.tree)

    def __enter__(self) -> RSSSampler:
        self.baseline = self.rss()
        self.peak = self.baseline
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            try:
                self.peak = max(self.peak, self.rss())
                self.samples += 1
            except psutil.NoSuchProcess:
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.final = self.rss()
        except psutil.NoSuchProcess:
            self.final = 0
        self.peak = max(self.peak, self.final)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


class CPUTimes:
    """CPU seconds (user + system) used by this process, the broker, nanio and the whole machine while a
    block runs: what the two cores went to, and whether anything else was running."""

    def __init__(self, broker_pid: int, nanio_pid: int) -> None:
        broker = psutil.Process(broker_pid)
        self.procs = {
            "client": [psutil.Process()],
            "broker": [broker, *broker.children(recursive=True)],  # with --workers, the workers too
            "nanio": [psutil.Process(nanio_pid)],
        }

    def _now(self) -> dict[str, float]:
        out = {name: sum(sum(p.cpu_times()[:2]) for p in procs) for name, procs in self.procs.items()}
        t = psutil.cpu_times()
        out["machine"] = (
            t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        )
        return out

    def __enter__(self) -> CPUTimes:
        self._start = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._now()
        self.used = {name: end[name] - self._start[name] for name in end}

    def row(self) -> str:
        u = self.used
        other = u["machine"] - u["client"] - u["broker"] - u["nanio"]
        return " | ".join(f"{u[n]:>7.2f}" for n in ("client", "broker", "nanio", "machine")) + f" | {other:>7.2f}"


def prefault(nbytes: int) -> None:
    """Touch ``nbytes`` of fresh memory and free it again. In a freshly booted VM, pages the guest has not
    touched yet cost extra on first use; nanio's part and object files take new page-cache pages, and
    without this the upload that runs second (the broker's) gets more untouched ones than raw boto3."""
    pages = np.empty(nbytes, np.uint8)
    pages[::4096] = 1
    del pages


def write_big_packet(path: Path, scratch: Path, size: int, topic: str, key: SigningKey, *, seed: int = 0) -> None:
    """A packet of about ``size`` bytes: 4×8 concepts plus a float32 ``traces`` [P, 64, 8] tensor.

    The traces are generated chunk-wise into a memory-mapped scratch file (finite normals), so
    this process never holds the packet in anonymous memory. Packets of other seeds differ in every
    tensor; the creation time is now, so two calls never write the same bytes (a re-published
    identical packet would be a no-op on the broker, and a timing of nothing)."""
    d, m = 8, 64
    rows = max(1, size // (m * d * 4))
    traces = np.memmap(scratch, dtype=np.float32, mode="w+", shape=(rows, m, d))
    rng = np.random.default_rng(seed)
    step = max(1, (16 * MiB) // (m * d * 4))
    for i in range(0, rows, step):
        n = min(step, rows - i)
        traces[i : i + n] = rng.standard_normal((n, m, d), dtype=np.float32)
    traces.flush()
    concepts = rng.standard_normal((4, d), dtype=np.float32)
    body = make_body(k=4, d=d, topic=topic, created_at=datetime.now(UTC))
    write_packet(path, body, {"concepts": concepts, "traces": traces}, key)
    del traces
    scratch.unlink()


def file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(8 * MiB)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(memoryview(buf)[:n])
    return h.hexdigest()


def upload(base: str, token: str, topic: str, path: Path) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/topics/{topic}/packets",
        content=file_chunks(path),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"},
        timeout=600,
    )


def download(base: str, token: str, packet_id: str, out: Path) -> int:
    with (
        httpx.stream(
            "GET", f"{base}/v1/packets/{packet_id}/blob", headers={"Authorization": f"Bearer {token}"}, timeout=600
        ) as r,
        open(out, "wb") as f,
    ):
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"download answered {r.status_code}: {r.text[:500]}")
        for chunk in r.iter_bytes(CHUNK):
            f.write(chunk)
    return out.stat().st_size


def log_problems(path: Path) -> list[str]:
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    return [ln for ln in lines if any(w in ln for w in ("ERROR", "Error", "Traceback", "Exception", "CRITICAL"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=512, help="packet size (default 512)")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("M2KT_TEST_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="a PostgreSQL server to create a throw-away database on (default: %(default)s)",
    )
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary files go (default: a temp dir)")
    parser.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the tiny upload/download that warms the broker before the baseline",
    )
    parser.add_argument("--broker-log", type=Path, default=None, help="keep the broker's log here")
    parser.add_argument(
        "--prefault",
        action="store_true",
        help="before each timed upload, touch and free 3x the packet's size of memory (fresh VMs: see prefault())",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="m2kt-bench-") as tmp_name:
        tmp = Path(tmp_name)
        broker_log = args.broker_log or tmp / "broker.log"
        try:
            with broker_stack(tmp, args.database_url, broker_log) as stack:
                broker, s3c, bucket, admin_token = stack.broker, stack.s3c, stack.bucket, stack.admin_token
                assert broker.proc is not None
                nanio_pid = stack.nanio_pid
                teacher = register_node(broker.url, admin_token, "teacher")
                assert teacher.key is not None
                topic = f"bench.mem-{uuid.uuid4().hex[:8]}"

                if not args.no_warmup:  # first-request imports and pools, so the baseline is a warm broker
                    small = tmp / "warmup.m2kt"
                    write_big_packet(small, tmp / "warmup.scratch", 2 * MiB, topic, teacher.key)
                    r = upload(broker.url, teacher.token, topic, small)
                    if r.status_code != 201:
                        raise RuntimeError(f"warm-up upload answered {r.status_code}: {r.text[:500]}")
                    download(broker.url, teacher.token, r.json()["id"], tmp / "warmup.down")
                    small.unlink()
                    (tmp / "warmup.down").unlink()

                path = tmp / "bench.m2kt"
                write_big_packet(path, tmp / "traces.scratch", args.size_mib * MiB, topic, teacher.key)
                size = path.stat().st_size
                digest = sha256_file(path)

                # Reference: boto3 to the same nanio bucket, same file (page-cached, like the broker's read).
                if args.prefault:
                    prefault(3 * size)
                with CPUTimes(broker.proc.pid, nanio_pid) as raw_cpu:
                    t0 = time.perf_counter()
                    s3c.upload_file(str(path), bucket, "raw/bench.m2kt")
                    t_raw_up = time.perf_counter() - t0

                if args.prefault:
                    prefault(3 * size)
                with RSSSampler(broker.proc.pid) as up_rss, CPUTimes(broker.proc.pid, nanio_pid) as up_cpu:
                    t0 = time.perf_counter()
                    r = upload(broker.url, teacher.token, topic, path)
                    t_up = time.perf_counter() - t0
                if r.status_code != 201:
                    raise RuntimeError(f"upload answered {r.status_code} (expected 201): {r.text[:500]}")
                packet_id = r.json()["id"]
                if packet_id != digest:
                    raise RuntimeError(f"the broker's packet id {packet_id} is not the file's sha256 {digest}")

                down = tmp / "down.m2kt"
                with RSSSampler(broker.proc.pid) as down_rss:
                    t0 = time.perf_counter()
                    got = download(broker.url, teacher.token, packet_id, down)
                    t_down = time.perf_counter() - t0
                broker_ok = got == size and sha256_file(down) == digest
                down.unlink()

                raw_down = tmp / "raw-down.m2kt"
                t0 = time.perf_counter()
                s3c.download_file(bucket, "raw/bench.m2kt", str(raw_down))
                t_raw_down = time.perf_counter() - t0
                raw_ok = sha256_file(raw_down) == digest
                raw_down.unlink()
                if not (broker_ok and raw_ok):
                    raise RuntimeError(
                        f"downloaded bytes differ from the file: broker ok={broker_ok}, boto3 ok={raw_ok}"
                    )
        except BaseException:
            if broker_log.exists():  # the log dies with the temp dir: show its end
                tail = broker_log.read_text(errors="replace").splitlines()[-40:]
                print("broker log (last lines):\n" + "\n".join("    " + ln for ln in tail), file=sys.stderr)
            raise
        problems = log_problems(broker_log)

    mb = size / 1e6
    rows = [
        ("upload via broker (POST, streamed from file)", mb / t_up, (mb / t_up) / (mb / t_raw_up)),
        ("raw boto3 upload_file (reference)", mb / t_raw_up, 1.0),
        ("download via broker (GET /blob, to file)", mb / t_down, (mb / t_down) / (mb / t_raw_down)),
        ("raw boto3 download_file (reference)", mb / t_raw_down, 1.0),
    ]
    print(
        f"\npacket: {size / MiB:,.0f} MiB ({size:,} bytes); broker as a process on Postgres + nanio (loopback); "
        f"{os.cpu_count()} CPU(s); {'warmed up' if not args.no_warmup else 'no warm-up'}"
        f"{'; memory prefaulted before each upload' if args.prefault else ''}\n"
    )
    print(f"| {'operation':<46} | {'MB/s':>8} | {'× raw boto3':>11} |")
    print(f"|{'-' * 48}|{'-' * 10}|{'-' * 13}|")
    for name, speed, ratio in rows:
        print(f"| {name:<46} | {speed:>8,.0f} | {ratio:>11.2f} |")

    print(f"\n| {'CPU seconds during the upload':<46} |  client |  broker |   nanio | machine |   other |")
    print(f"|{'-' * 48}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 9}|")
    print(f"| {'upload via broker':<46} | {up_cpu.row()} |")
    print(f"| {'raw boto3 upload_file':<46} | {raw_cpu.row()} |")

    def mib(n: int) -> str:
        return f"{n / MiB:,.1f}"

    print(
        f"\n| {'broker RSS':<34} | {'baseline MiB':>12} | {'peak MiB':>9} | {'final MiB':>9} "
        f"| {'growth MiB':>10} | {'% of packet':>11} | {'samples':>7} |"
    )
    print(f"|{'-' * 36}|{'-' * 14}|{'-' * 11}|{'-' * 11}|{'-' * 12}|{'-' * 13}|{'-' * 9}|")
    for name, s in (("during upload", up_rss), ("during download", down_rss)):
        print(
            f"| {name:<34} | {mib(s.baseline):>12} | {mib(s.peak):>9} | {mib(s.final):>9} "
            f"| {mib(s.growth):>10} | {s.growth / size:>11.1%} | {s.samples:>7} |"
        )
    print(
        f"\nupload peak RSS growth = {up_rss.growth / MiB:.1f} MiB = {up_rss.growth / size:.1%} of the packet; "
        f"downloads match the file's sha256: yes"
    )
    if problems:
        print(f"\nbroker log: {len(problems)} line(s) look like errors:")
        for line in problems[:20]:
            print("    " + line)
    else:
        print("broker log: no errors")


if __name__ == "__main__":
    main()
