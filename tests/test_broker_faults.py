"""The fault suite, on real processes: the S3 server stopped during an upload and during a download, a
Postgres backend terminated mid-transaction, the broker SIGKILLed during an upload and mid-commit, and garbage
collection during a slow commit — each followed by recovery.

Every scenario has its own database, S3 server and bucket (tests/fault_harness.py), so its counts are exact, and
ends with the same checks: every acknowledged packet is committed and served, no row lacks its blob, and garbage
collection (no grace period) leaves no orphan blob and never removes a blob a row points at. The table of counts
is printed after the module's last test (with or without ``-s``) and written to ``$M2KT_FAULTS_REPORT`` when set.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from m2kt.benchmarks.harness.brokers import unique
from m2kt.broker.gc import collect_garbage
from m2kt.errors import ServiceUnavailable, TransportError
from m2kt.sdk.client import BrokerClient
from m2kt.sdk.retry import RetryPolicy
from tests.fault_harness import (
    CONNECTION_DROPPED,
    CutDownload,
    FaultRow,
    Ledger,
    MiB,
    Stack,
    big_packet,
    body_that,
    describe,
    gc_api,
    gc_cli,
    in_thread,
    key_of,
    markdown_table,
    packet_id,
    require_nanio,
    small_packet,
    terminate_backends,
    topic_row_locked,
    wait_for_listener,
    wait_for_lock_waiter,
)

# The broker reads from S3 only as fast as the client takes the bytes, so S3 can be ahead of the client by at
# most the socket buffers between them (here up to ~40 MiB): a bigger packet is cut by stopping S3 whatever the
# kernel does with what is buffered when nanio dies (in practice the broker's next read fails at once).
DOWNLOAD_MIB = 48
INLINE = 64 << 10  # M2KT_INLINE_BLOB_MAX_BYTES in the inline variants: the small packets go to the database


@pytest.fixture(scope="module")
def fault_table(request: pytest.FixtureRequest) -> Iterator[list[FaultRow]]:
    """Rows the scenarios add; printed as Markdown (and written to $M2KT_FAULTS_REPORT) after the last one."""
    rows: list[FaultRow] = []
    yield rows
    table = markdown_table(rows)
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n\nFaults (each scenario on its own database, S3 server and bucket):\n\n" + table)
    if path := os.environ.get("M2KT_FAULTS_REPORT"):
        Path(path).write_text(table)


@pytest.fixture
def stack(postgres_url: str, tmp_path: Path) -> Iterator[Stack]:
    require_nanio()
    stack = Stack.create(postgres_url, tmp_path)
    try:
        yield stack
    finally:
        stack.close()


def test_s3_stopped_during_upload(stack: Stack, fault_table: list[FaultRow], tmp_path: Path) -> None:
    """S3 goes away mid-upload: that upload is 503 (or cut), nothing acknowledged before is lost, and once
    S3 is back the same upload succeeds; GC discards the multipart upload that could not be aborted."""
    ledger = Ledger("S3 stopped during an upload")
    stack.start_broker()
    teacher = stack.teacher()
    topic = unique("s3up")
    for seed in (1, 2):
        assert ledger.upload(stack.url, teacher, topic, small_packet(tmp_path, teacher, topic, seed)).status_code == 201
    big = big_packet(tmp_path, teacher, topic)
    # The whole body is sent: the parts after the outage fail (parts go out in the background, so the ones
    # before it may already be stored). The broker may also answer before it has read the whole body.
    body = body_that(big, 12 * MiB, stack.stop_s3, then_stop=False)
    assert ledger.faulted(stack.url, teacher, topic, big, body) in ("503 storage_unavailable", *CONNECTION_DROPPED)
    ready = httpx.get(f"{stack.url}/readyz")
    assert (ready.status_code, ready.json()["code"]) == (503, "storage_unavailable")
    assert packet_id(big) not in stack.rows()

    stack.start_s3()  # same port, same data
    assert httpx.get(f"{stack.url}/readyz").status_code == 200
    assert stack.rows_without_blob() == []
    ledger.collect(stack)
    # The multipart upload S3 never heard the end of is gone: aborted by the broker if S3 came back before
    # its abort gave up (its part retries back off for a few seconds), else discarded by GC.
    assert not list(stack.storage().unfinished_uploads())
    assert ledger.upload(stack.url, teacher, topic, big).status_code == 201
    assert ledger.upload(stack.url, teacher, topic, small_packet(tmp_path, teacher, topic, 3)).status_code == 201
    fault_table.append(ledger.finish(stack, teacher))


def test_s3_stopped_during_download(stack: Stack, fault_table: list[FaultRow], tmp_path: Path) -> None:
    """S3 goes away mid-download: BrokerClient.fetch raises and leaves nothing at the destination (no
    truncated file passes as good); while S3 is away downloads are 503; once it is back the fetch succeeds."""
    ledger = Ledger("S3 stopped during a download")
    stack.start_broker()
    teacher = stack.teacher()
    topic = unique("s3down")
    big = big_packet(tmp_path, teacher, topic, mib=DOWNLOAD_MIB)
    pid = packet_id(big)
    assert ledger.upload(stack.url, teacher, topic, big).status_code == 201
    inbox = tmp_path / "inbox"
    inbox.mkdir()

    def client(transport: httpx.BaseTransport | None = None, attempts: int = 1) -> BrokerClient:
        policy = RetryPolicy(attempts=attempts, backoff=0.1)
        return BrokerClient(
            stack.url, teacher.token, prefer_redirect=False, quiet=True, retry=policy, transport=transport
        )

    cut = CutDownload(MiB, stack.stop_s3)
    with client(cut) as broker, pytest.raises(TransportError):
        broker.fetch(pid, inbox)
    assert 0 < cut.received < len(big), f"the stream was not cut: {cut.received} of {len(big)} bytes arrived"
    assert list(inbox.iterdir()) == []  # neither the packet nor a temporary file
    ledger.faults.append(f"fetch cut after {cut.received / MiB:.1f} of {len(big) / MiB:.1f} MiB: TransportError")

    with client() as broker, pytest.raises(ServiceUnavailable) as refused:
        broker.fetch(pid, inbox)
    assert refused.value.code == "storage_unavailable"
    assert list(inbox.iterdir()) == []
    ledger.faults.append(f"fetch while S3 is away: {refused.value.status} {refused.value.code}")
    assert stack.broker is not None and stack.broker.proc is not None and stack.broker.proc.poll() is None

    stack.start_s3()
    with client(attempts=3) as broker:
        fetched = broker.fetch(pid, inbox)
    assert fetched.path.read_bytes() == big
    assert sorted(p.name for p in inbox.iterdir()) == [f"{pid}.m2kt"]
    fault_table.append(ledger.finish(stack, teacher))


@pytest.mark.parametrize("inline", [False, True], ids=["s3", "inline"])
def test_postgres_backend_terminated_mid_commit(
    stack: Stack, fault_table: list[FaultRow], tmp_path: Path, inline: bool
) -> None:
    """The broker's commit transaction waits on a row lock; its backend is terminated there. The upload is
    503 with no row (the promoted blob is an orphan until GC; an inline blob, written by that transaction,
    is not there at all) and the same upload then succeeds. Terminating every backend of the broker between
    requests is recovered from on the next request."""
    ledger = Ledger("Postgres backend terminated mid-commit" + (", inline blobs" if inline else ""))
    stack.inline_blob_max_bytes = INLINE if inline else 0
    stack.start_broker()
    teacher = stack.teacher()
    topic = unique("pgdrop")
    assert ledger.upload(stack.url, teacher, topic, small_packet(tmp_path, teacher, topic, 1)).status_code == 201
    victim = small_packet(tmp_path, teacher, topic, 2)
    with topic_row_locked(stack, topic):
        pending = in_thread(ledger.faulted, stack.url, teacher, topic, victim)
        waiting = wait_for_lock_waiter(stack)
        assert terminate_backends(stack, [waiting]) == 1
        outcome = pending.result(timeout=30)
    assert outcome == "503 database_unavailable", outcome  # the broker does not retry the commit
    assert packet_id(victim) not in stack.rows()
    # S3: promoted before the commit, which never happened; inline: rolled back with its row
    assert stack.orphans() == ([] if inline else [key_of(victim)])

    ledger.collect(stack)
    assert ledger.orphans_before_gc == (0 if inline else 1) and ledger.orphans_after_gc == 0
    assert ledger.upload(stack.url, teacher, topic, victim).status_code == 201

    # Every connection the broker holds (pooled and LISTEN) terminated between requests: the next one recovers.
    dropped = terminate_backends(stack)
    assert dropped >= 2, dropped
    after = ledger.upload(stack.url, teacher, topic, small_packet(tmp_path, teacher, topic, 3))
    assert after.status_code == 201, after.text
    ledger.faults.append(f"all {dropped} backends terminated between requests, next upload {describe(after)}")
    wait_for_listener(stack)
    fault_table.append(ledger.finish(stack, teacher))


def test_broker_killed_during_upload(stack: Stack, fault_table: list[FaultRow], tmp_path: Path) -> None:
    """The broker is SIGKILLed while parts are being sent: no row, no blob, only an unfinished multipart
    upload, which GC discards after a restart on the same database and bucket; the re-upload succeeds."""
    ledger = Ledger("broker SIGKILLed during an upload")
    stack.start_broker()
    teacher = stack.teacher()
    topic = unique("kill")
    assert ledger.upload(stack.url, teacher, topic, small_packet(tmp_path, teacher, topic, 1)).status_code == 201
    big = big_packet(tmp_path, teacher, topic)
    assert (
        ledger.faulted(stack.url, teacher, topic, big, body_that(big, 12 * MiB, stack.kill_broker))
        in CONNECTION_DROPPED
    )
    assert stack.broker is not None and stack.broker.proc is not None and stack.broker.proc.returncode == -9
    assert packet_id(big) not in stack.rows()
    assert not stack.storage().exists(key_of(big))  # the multipart upload on the final key was never completed
    assert stack.rows_without_blob() == []

    stack.start_broker()
    ledger.collect(stack, gc_cli)  # an operator's `m2kt broker gc`
    assert ledger.unfinished_discarded >= 1
    assert ledger.upload(stack.url, teacher, topic, big).status_code == 201
    assert ledger.upload(stack.url, teacher, topic, small_packet(tmp_path, teacher, topic, 2)).status_code == 201
    fault_table.append(ledger.finish(stack, teacher))


@pytest.mark.parametrize("inline", [False, True], ids=["s3", "inline"])
def test_broker_killed_mid_commit(stack: Stack, fault_table: list[FaultRow], tmp_path: Path, inline: bool) -> None:
    """The broker is SIGKILLed after promoting the blob (or, inline, writing it in the transaction), while its
    commit waits on a row lock. The event append and its COMMIT were sent together (one round trip), so
    Postgres already holds the COMMIT: once the lock is free the packet commits with its blob, unacknowledged —
    no orphan, no row without its blob — and after a restart the re-upload is answered 200 with the stored
    record."""
    ledger = Ledger("broker SIGKILLed mid-commit" + (", inline blobs" if inline else ""))
    stack.inline_blob_max_bytes = INLINE if inline else 0
    stack.start_broker()
    teacher = stack.teacher()
    topic = unique("killc")
    assert ledger.upload(stack.url, teacher, topic, small_packet(tmp_path, teacher, topic, 1)).status_code == 201
    victim = small_packet(tmp_path, teacher, topic, 2)
    with topic_row_locked(stack, topic):
        pending = in_thread(ledger.faulted, stack.url, teacher, topic, victim)
        wait_for_lock_waiter(stack)
        stack.kill_broker()
        outcome = pending.result(timeout=30)
    assert outcome in CONNECTION_DROPPED, outcome
    for _ in range(1200):  # the orphaned backend commits once the lock is released
        if packet_id(victim) in stack.rows():
            break
        time.sleep(0.05)
    assert packet_id(victim) in stack.rows()
    assert stack.rows_without_blob() == [] and stack.orphans() == []

    stack.start_broker()
    ledger.collect(stack, gc_api)  # the restarted broker's POST /v1/admin/gc
    assert ledger.orphans_before_gc == 0 and ledger.orphans_after_gc == 0
    assert ledger.upload(stack.url, teacher, topic, victim).status_code == 200
    fault_table.append(ledger.finish(stack, teacher))


def test_gc_during_a_commit_delayed_past_the_grace_period(
    stack: Stack, fault_table: list[FaultRow], tmp_path: Path
) -> None:
    """GC runs while an upload's blob is visible and old enough to look orphaned but its row is not yet
    committed (the commit waits on a row lock for longer than the grace period). The upload holds the blob's
    lock, so GC skips it; the upload then commits and the packet is served. (Before the blob lock this lost an
    acknowledged packet: GC deleted the blob, then the row committed.)"""
    ledger = Ledger("GC during a commit delayed past the grace period")
    stack.start_broker()
    teacher = stack.teacher()
    topic = unique("gcrace")
    assert ledger.upload(stack.url, teacher, topic, small_packet(tmp_path, teacher, topic, 1)).status_code == 201
    victim = small_packet(tmp_path, teacher, topic, 2)
    with topic_row_locked(stack, topic):
        pending = in_thread(ledger.upload, stack.url, teacher, topic, victim)
        wait_for_lock_waiter(stack)  # blob completed and promoted, row inserted, commit waiting on the topic row
        time.sleep(1.5)
        with stack.sessions() as sessions:
            report = collect_garbage(sessions, stack.storage(), grace_seconds=1.0)
        assert report.deleted == [] and report.busy == 1, report
    assert pending.result(timeout=30).status_code == 201
    ledger.faults.append(f"GC with a 1 s grace while the commit waited 1.5 s: busy {report.busy}, deleted 0")
    fault_table.append(ledger.finish(stack, teacher))
