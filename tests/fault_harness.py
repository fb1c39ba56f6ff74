"""The fault suite's harness (tests/test_broker_faults.py).

A :class:`Stack` is one scenario's own world — a Postgres database, an S3 server (nanio, a process that can be
stopped and started again on the same port and data), a bucket and ``m2kt broker serve`` processes — so what is
counted at the end is exactly what that scenario did. A :class:`Ledger` records what the scenario sent and what it
was told; :meth:`Ledger.collect` runs garbage collection and :meth:`Ledger.finish` checks the targets (every
acknowledged packet committed and served, no row without its blob, no orphan blob left) and returns the
scenario's :class:`FaultRow` for the table.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
import psycopg
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from m2kt.benchmarks.harness.brokers import (
    BrokerProcess,
    Node,
    create_database,
    drop_database,
    register_node,
    s3_env,
    unique,
)
from m2kt.benchmarks.harness.packets import make_tensors, packet_bytes
from m2kt.benchmarks.harness.services import S3Server, libpq_url, start_nanio
from m2kt.broker.db import make_engine, make_sessionmaker, upgrade
from m2kt.broker.gc import GcReport, collect_garbage
from m2kt.broker.models import Packet
from m2kt.broker.services.upload import blob_key
from m2kt.broker.storage import S3Store, with_inline_blobs
from tests.services import unavailable

T = TypeVar("T")

MiB = 1 << 20
CONNECTION_DROPPED = ("RemoteProtocolError", "ReadError", "WriteError")  # how httpx reports a dropped request
PART_SIZE = 5 * MiB  # the broker's S3 part size here: a 24 MiB packet is five parts

# ----------------------------------------------------------------------------- packets and bodies


def packet_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def key_of(data: bytes) -> str:
    """The storage key the broker gives these packet bytes."""
    (n,) = struct.unpack("<Q", data[:8])
    return blob_key(hashlib.sha256(data[8 + n :]).hexdigest(), hashlib.sha256(data[: 8 + n]).hexdigest())


def small_packet(tmp: Path, node: Node, topic: str, seed: int) -> bytes:
    """A few KiB: sent as one S3 put_object."""
    assert node.key is not None
    return packet_bytes(tmp, node.key, topic, seed=seed)


def big_packet(tmp: Path, node: Node, topic: str, mib: int = 24) -> bytes:
    """About ``mib`` MiB: sent as an S3 multipart upload of several parts."""
    assert node.key is not None
    rng = np.random.default_rng(7)
    tensors = {**make_tensors(), "attention": rng.random((mib * MiB // 4 // 1024, 1024), dtype=np.float32)}
    return packet_bytes(tmp, node.key, topic, tensors=tensors)


def body_that(data: bytes, after_bytes: int, action: Callable[[], None], *, then_stop: bool = True) -> Iterator[bytes]:
    """A request body that runs ``action`` once ``after_bytes`` have been sent, then ends (or, with
    ``then_stop=False``, sends the rest)."""
    sent = 0
    done = False
    for i in range(0, len(data), MiB):
        if sent >= after_bytes and not done:
            action()
            done = True
            if then_stop:
                return
        yield data[i : i + MiB]
        sent += MiB


class CutDownload(httpx.BaseTransport):
    """An HTTP transport (with a small receive buffer) that runs ``action`` once a ``/blob`` response has
    delivered ``after_bytes``, then goes on reading; ``received`` counts the blob bytes that arrived."""

    def __init__(self, after_bytes: int, action: Callable[[], None]) -> None:
        options = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)]
        self.inner = httpx.HTTPTransport(socket_options=options)
        self.after_bytes = after_bytes
        self.action: Callable[[], None] | None = action
        self.received = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if not request.url.path.endswith("/blob") or response.status_code not in (200, 206):
            return response
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_Counted(self, response.stream),  # type: ignore[arg-type]
            extensions=response.extensions,
        )

    def close(self) -> None:
        self.inner.close()


class _Counted(httpx.SyncByteStream):
    def __init__(self, owner: CutDownload, inner: httpx.SyncByteStream) -> None:
        self.owner = owner
        self.inner = inner

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            self.owner.received += len(chunk)
            if self.owner.action is not None and self.owner.received >= self.owner.after_bytes:
                action, self.owner.action = self.owner.action, None
                action()
            yield chunk

    def close(self) -> None:
        self.inner.close()


# ----------------------------------------------------------------------------- one scenario's services


def require_nanio() -> None:
    """The scenarios stop and restart their own S3 server, so they need nanio whatever S3 CI provides."""
    if shutil.which("nanio") is None and not Path(sys.executable).with_name("nanio").exists():
        unavailable("the fault suite needs nanio (pip install -e '.[test]') to stop and restart an S3 server")


@dataclass
class Stack:
    """One scenario's database, S3 server, bucket and broker process."""

    tmp: Path
    database_url: str
    s3: S3Server
    nanio: subprocess.Popen[bytes] | None
    bucket: str = field(default_factory=lambda: unique("faults"))
    admin_token: str = field(default_factory=lambda: "m2kt_admin_" + uuid.uuid4().hex)
    broker: BrokerProcess | None = None
    brokers_started: int = 0
    inline_blob_max_bytes: int = 0  # M2KT_INLINE_BLOB_MAX_BYTES: small packets written with their row

    @classmethod
    def create(cls, postgres_url: str, tmp: Path) -> Stack:
        database_url = create_database(postgres_url)
        upgrade(database_url)
        nanio, s3 = start_nanio(tmp / "s3", log_path=tmp / "nanio.log")
        stack = cls(tmp, database_url, s3, nanio)
        s3.client().create_bucket(Bucket=stack.bucket)
        return stack

    def close(self) -> None:
        if self.broker is not None:
            self.broker.stop()
        if self.nanio is not None:
            self.nanio.kill()
            self.nanio.wait()
        drop_database(self.database_url)

    @property
    def env(self) -> dict[str, str]:
        return {
            "M2KT_DATABASE_URL": self.database_url,
            "M2KT_STORAGE_URL": f"s3://{self.bucket}",
            "M2KT_DATA_DIR": str(self.tmp),
            "M2KT_BOOTSTRAP_ADMIN_TOKEN": self.admin_token,
            "M2KT_UPLOAD_PART_BYTES": str(PART_SIZE),
            "M2KT_GC_INTERVAL_SECONDS": "0",  # only the scenario collects garbage, so its counts are exact
            "M2KT_INLINE_BLOB_MAX_BYTES": str(self.inline_blob_max_bytes),
            **s3_env(self.s3),
        }

    @property
    def url(self) -> str:
        assert self.broker is not None
        return self.broker.url

    # -- processes

    def start_broker(self) -> BrokerProcess:
        """``m2kt broker serve`` on this stack (a fresh process, a fresh port)."""
        self.brokers_started += 1
        self.broker = BrokerProcess(self.env, log_path=self.tmp / f"broker{self.brokers_started}.log").start()
        return self.broker

    def kill_broker(self) -> None:
        assert self.broker is not None
        self.broker.kill()

    def stop_s3(self) -> None:
        """SIGKILL the S3 server."""
        assert self.nanio is not None
        self.nanio.kill()
        self.nanio.wait()

    def start_s3(self) -> None:
        """Start the S3 server again, on the same port and data directory."""
        port = int(self.s3.endpoint.rsplit(":", 1)[1])
        self.nanio, _ = start_nanio(self.tmp / "s3", port=port, log_path=self.tmp / "nanio.log")

    def teacher(self) -> Node:
        return register_node(self.url, self.admin_token, "teacher")

    # -- what is stored

    def storage(self) -> S3Store:
        return S3Store(self.s3.client(), self.bucket, part_size=PART_SIZE)

    @contextmanager
    def sessions(self) -> Iterator[sessionmaker[Session]]:
        engine = make_engine(self.database_url)
        try:
            yield make_sessionmaker(engine)
        finally:
            engine.dispose()

    def rows(self) -> dict[str, str]:
        """Every packet row: id -> storage key."""
        with self.sessions() as sessions, sessions() as session:
            return {pid: key for pid, key in session.execute(select(Packet.id, Packet.storage_key))}

    def blobs(self) -> set[str]:
        """Blob keys under packets/, in S3 and in the database (inline blobs)."""
        with self.pg() as conn:
            inline = {key for (key,) in conn.execute("SELECT key FROM inline_blobs WHERE key LIKE 'packets/%'")}
        return inline | {blob.key for blob in self.storage().list("packets/")}

    def rows_without_blob(self) -> list[str]:
        blobs = self.blobs()
        return sorted(pid for pid, key in self.rows().items() if key not in blobs)

    def orphans(self) -> list[str]:
        """Blobs under packets/ that no row points at."""
        return sorted(self.blobs() - set(self.rows().values()))

    def unfinished(self) -> int:
        return sum(1 for _ in self.storage().unfinished_uploads())

    @contextmanager
    def pg(self) -> Iterator[psycopg.Connection]:
        """A psycopg connection to this stack's database (autocommit)."""
        with psycopg.connect(libpq_url(self.database_url), autocommit=True) as conn:
            yield conn


# ----------------------------------------------------------------------------- Postgres faults


def in_thread(fn: Callable[..., T], *args: object) -> Future[T]:
    """Run ``fn(*args)`` in a background thread (a request that is about to block)."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    return future


@contextmanager
def topic_row_locked(stack: Stack, topic: str) -> Iterator[int]:
    """Hold ``SELECT … FOR NO KEY UPDATE`` on the topic's row (yields the locking backend's pid): a broker
    committing a packet to it then waits, mid-transaction, until the block ends — at the event append,
    after its row is written and its blob promoted (the row's foreign-key check on the topic takes only
    a KEY SHARE lock, which this one does not block)."""
    with psycopg.connect(libpq_url(stack.database_url)) as conn:
        row = conn.execute("SELECT id FROM topics WHERE name = %s FOR NO KEY UPDATE", (topic,)).fetchone()
        assert row is not None, f"no topic {topic!r}"
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()
        try:
            yield pid[0] if pid else 0
        finally:
            conn.rollback()


def wait_for_lock_waiter(stack: Stack, timeout: float = 15.0) -> int:
    """The pid of a backend of this database waiting on a lock (the broker's, mid-commit)."""
    deadline = time.monotonic() + timeout
    with stack.pg() as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
            ).fetchone()
            if row is not None:
                return int(row[0])
            time.sleep(0.02)
    raise TimeoutError("no backend waited on the lock")


def terminate_backends(stack: Stack, pids: list[int] | None = None) -> int:
    """``pg_terminate_backend`` the given backends, or every other backend of this database; returns how many."""
    with stack.pg() as conn:
        if pids is None:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchall()
            pids = [int(r[0]) for r in rows]
        terminated = 0
        for pid in pids:
            row = conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
            terminated += bool(row and row[0])
        return terminated


def wait_for_listener(stack: Stack, timeout: float = 15.0) -> None:
    """Wait until a backend of this database is the broker's ``LISTEN`` connection."""
    deadline = time.monotonic() + timeout
    with stack.pg() as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND query ILIKE 'LISTEN %%'"
            ).fetchone()
            if row is not None:
                return
            time.sleep(0.05)
    raise TimeoutError("the broker's LISTEN connection did not come back")


# ----------------------------------------------------------------------------- garbage collection, three ways


def gc_in_process(stack: Stack) -> GcReport:
    """``m2kt.broker.gc.collect_garbage`` called here, with no grace period."""
    with stack.sessions() as sessions:
        storage = with_inline_blobs(stack.storage(), sessions.kw["bind"], stack.inline_blob_max_bytes)
        return collect_garbage(sessions, storage, 0.0)


def gc_cli(stack: Stack) -> GcReport:
    """``m2kt broker gc --grace-seconds 0 --json``, as an operator runs it (reads the broker's M2KT_* env)."""
    exe = str(Path(sys.executable).with_name("m2kt"))
    done = subprocess.run(
        [exe, "broker", "gc", "--grace-seconds", "0", "--json"],
        env={**os.environ, **stack.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return GcReport(**json.loads(done.stdout))


def gc_api(stack: Stack) -> GcReport:
    """``POST /v1/admin/gc?grace_seconds=0`` on the running broker."""
    r = httpx.post(
        f"{stack.url}/v1/admin/gc",
        params={"grace_seconds": 0},
        headers={"Authorization": f"Bearer {stack.admin_token}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return GcReport(**r.json())


# ----------------------------------------------------------------------------- the accounting


@dataclass
class FaultRow:
    """One line of the fault table."""

    scenario: str
    uploads: int  # upload requests sent, retries included
    attempted: int  # distinct packets sent
    acknowledged: int  # ... answered 2xx
    committed: int  # ... with a row
    served: int  # ... downloaded with the right sha256 at the end
    rows_without_blob: int
    orphans_before_gc: int
    orphans_after_gc: int
    unfinished_discarded: int
    fault: str  # how the faulted request(s) ended

    TITLES = (
        "scenario",
        "uploads sent",
        "packets attempted",
        "acknowledged",
        "committed",
        "served",
        "rows without blob",
        "orphans before GC",
        "orphans after GC",
        "unfinished uploads discarded",
        "faulted request(s)",
    )

    def cells(self) -> list[str]:
        return [str(getattr(self, f.name)) for f in fields(self)]


def markdown_table(rows: list[FaultRow]) -> str:
    lines = ["| " + " | ".join(FaultRow.TITLES) + " |", "|" + "---|" * len(FaultRow.TITLES)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def served(url: str, node: Node, ids: list[str]) -> set[str]:
    """The packets among ``ids`` that the broker serves with the right bytes (sha256 = packet id)."""
    ok = set()
    for pid in ids:
        r = httpx.get(f"{url}/v1/packets/{pid}/blob", headers={"Authorization": f"Bearer {node.token}"}, timeout=60)
        if r.status_code == 200 and packet_id(r.content) == pid:
            ok.add(pid)
    return ok


def describe(outcome: httpx.Response | Exception) -> str:
    if isinstance(outcome, Exception):
        return type(outcome).__name__
    try:
        return f"{outcome.status_code} {outcome.json().get('code', '')}".rstrip()
    except ValueError:
        return str(outcome.status_code)


@dataclass
class Ledger:
    """What one scenario sent, what it was told, and what garbage collection found."""

    scenario: str
    sent: dict[str, bytes] = field(default_factory=dict)  # packet id -> bytes, every packet attempted
    acknowledged: set[str] = field(default_factory=set)
    uploads: int = 0
    faults: list[str] = field(default_factory=list)
    orphans_before_gc: int = 0
    orphans_after_gc: int = 0
    unfinished_discarded: int = 0
    gc_reports: list[GcReport] = field(default_factory=list)

    def upload(self, url: str, node: Node, topic: str, data: bytes, content: object = None) -> httpx.Response:
        """POST a packet (``content``: a body to send instead of ``data``); a 2xx acknowledges it."""
        pid = packet_id(data)
        self.sent[pid] = data
        self.uploads += 1
        r = httpx.post(
            f"{url}/v1/topics/{topic}/packets",
            content=data if content is None else content,  # type: ignore[arg-type]
            headers={"Authorization": f"Bearer {node.token}"},
            timeout=120,
        )
        if r.is_success:
            self.acknowledged.add(pid)
        return r

    def faulted(self, url: str, node: Node, topic: str, data: bytes, content: object = None) -> str:
        """An upload a fault hits: returns (and records) how it ended — a status and code, or the exception."""
        outcome: httpx.Response | Exception
        try:
            outcome = self.upload(url, node, topic, data, content)
        except httpx.TransportError as exc:
            outcome = exc
        self.faults.append(describe(outcome))
        return self.faults[-1]

    def collect(self, stack: Stack, gc: Callable[[Stack], GcReport] = gc_in_process) -> GcReport:
        """Garbage-collect with no grace period; check it removed exactly the orphans and no blob a row points
        at (``finish`` then downloads every committed packet)."""
        before = stack.orphans()
        report = gc(stack)
        after = stack.orphans()
        assert report.errors == [], report.errors
        assert sorted(report.deleted) == before, (report.deleted, before)
        assert stack.rows_without_blob() == [], "GC removed a blob a row points at"
        self.gc_reports.append(report)
        self.orphans_before_gc += len(before)
        self.orphans_after_gc = max(self.orphans_after_gc, len(after))
        self.unfinished_discarded += report.unfinished_discarded
        return report

    def finish(self, stack: Stack, node: Node) -> FaultRow:
        """Collect once more, check the targets (downloading every committed packet after GC), and return the
        scenario's row."""
        self.collect(stack)
        rows = stack.rows()
        assert set(rows) <= set(self.sent), "a row for a packet nobody sent"
        got = served(stack.url, node, sorted(rows))
        lost = self.acknowledged - got
        assert not lost, f"acknowledged but not served: {sorted(lost)}"
        assert got == set(rows), f"committed but not served: {sorted(set(rows) - got)}"
        without_blob = stack.rows_without_blob()
        assert without_blob == [], f"rows without their blob: {without_blob}"
        assert self.orphans_after_gc == 0 and stack.orphans() == [], "orphan blobs left after GC"
        assert stack.unfinished() == 0, "unfinished uploads left after GC"
        return FaultRow(
            self.scenario,
            self.uploads,
            len(self.sent),
            len(self.acknowledged),
            len(rows),
            len(got),
            len(without_blob),
            self.orphans_before_gc,
            self.orphans_after_gc,
            self.unfinished_discarded,
            "; ".join(self.faults),
        )
