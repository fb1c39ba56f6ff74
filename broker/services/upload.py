"""Receiving a packet: stream to staging while hashing, validate, promote the blob, then commit the row.

Order is what makes failures leave nothing behind:

1. the body is read in ~1 MiB batches, each handed to a worker thread (hashing, staging) while the
   next batch is read. The header, in the first batch(es), is checked as soon as it has arrived;
   only then does staging start, under the blob's final key
   ``packets/<data sha256>-<sha256 of length prefix + header>.m2kt`` — the signed data digest
   (verified before step 3) and the digest of the header bytes as received, so the key names
   exactly one file content. On S3 that is a multipart upload on the final key, whose parts are
   sent while the body is still arriving and which stays invisible until completed; locally it
   is a file under ``incoming/``;
2. any refusal aborts the staged upload — no row was written, no blob is left;
3. on success, in one transaction that holds the blob key's lock (:mod:`m2kt.broker.bloblocks`), the
   upload is completed (S3: the object appears, nothing is copied), promoted (local: renamed into
   ``packets/``) and its row inserted and committed — so a row never points at a missing blob, and
   garbage collection, which takes the same lock, cannot delete the blob before the row commits.
   A crash in between leaves a blob without a row, which garbage collection removes after a grace
   period; a crash before leaves only an unfinished multipart upload or a file in ``incoming/``.
   A packet small enough for inline blobs (``M2KT_INLINE_BLOB_MAX_BYTES``) has its bytes written by this
   same transaction, next to its row: both appear at its COMMIT, or neither.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from psycopg.rows import namedtuple_row
from psycopg.types.json import Jsonb
from sqlalchemy import ARRAY, String, any_, bindparam, exists, func, insert, literal_column, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session

from m2kt.broker.bloblocks import blob_lock_id, locked_transaction
from m2kt.broker.caller import Caller
from m2kt.broker.errors import BrokerError, Malformed, TooLarge, TooManyRequests, ValidationFailed
from m2kt.broker.models import (
    ApiToken,
    EventKind,
    FlaggedConceptSet,
    LineageEdge,
    Node,
    Packet,
    PacketStatus,
    PublicKey,
    Topic,
    utcnow,
)
from m2kt.broker.schemas import PacketOut, SafetyVerdict
from m2kt.broker.services import audit
from m2kt.broker.services.auth import TOKEN_BY_ID_SQL, refuse_unusable, token_state
from m2kt.broker.services.pipelined import compiled, driver_connection, driver_errors, read_pipeline, stored_member
from m2kt.broker.services.records import packet_out
from m2kt.broker.services.topics import append_event_and_commit, check_topic_quota, get_or_create_topic
from m2kt.broker.state import BrokerState
from m2kt.broker.storage import StagedUpload, StorageError
from m2kt.broker.storage.database import upsert, upsert_values
from m2kt.broker.threads import in_limited_thread, in_thread
from m2kt.broker.validation import (
    FlaggedSet,
    Received,
    SafetyReport,
    StreamingPacket,
    check_signature,
    declared_safety,
    flagged_similarity,
    unit_rows,
)
from m2kt.format.keys import VerifyKey

BATCH = 1 << 20  # bytes handed to a worker thread at a time


def blob_key(data_sha256: str, header_sha256: str) -> str:
    """Where a packet's bytes go: named by digests known once its header has arrived.

    The data digest is the one the signed manifest claims (checked before the blob is completed),
    the header digest is of the bytes received; together they fix the whole file, so one key is
    one content, and uploads of the same packet write the same bytes to the same key."""
    return f"packets/{data_sha256}-{header_sha256}.m2kt"


@dataclass
class _Checked:
    key_fingerprint: str
    threshold: float
    topic_id: int | None  # None: this upload creates the topic
    flagged: list[FlaggedSet]  # the flagged concept sets, read with the key (one session per header)


@dataclass
class _HeaderRows:
    """What the header check reads from the database, in one round trip on Postgres."""

    key: Any  # (revoked_at, owner_id, public_key) of the signing key, or None: not registered
    withdrawn_parents: list[tuple[str, PacketStatus]]  # the manifest's parents held here, not accepted
    topic: Any  # (id, safety_threshold), or None: this upload would create the topic
    blob_stored: bool  # a row already points at this very file (read only when a node quota is set)
    used: int  # the node's stored bytes (read only when a node quota is set)
    flagged: list[FlaggedSet]


_FLAGGED_COLUMNS = (
    FlaggedConceptSet.name,
    FlaggedConceptSet.labels,
    FlaggedConceptSet.directions,
    FlaggedConceptSet.threshold,
)
# The header check's reads, each with its bound parameters by name; "parents" differs by database (ANY on
# Postgres, an expanding IN elsewhere).
_HEADER_READS: dict[str, Any] = {
    "key": select(PublicKey.revoked_at, PublicKey.owner_id, PublicKey.public_key).where(
        PublicKey.fingerprint == bindparam("fingerprint")
    ),
    "topic": select(Topic.id, Topic.safety_threshold).where(Topic.name == bindparam("topic")),
    "flagged": select(*_FLAGGED_COLUMNS),
    "parents": select(Packet.id, Packet.status).where(Packet.id.in_(bindparam("parents", expanding=True))),
    "blob_stored": select(exists().where(Packet.storage_key == bindparam("blob")).label("stored")),
    "used": select(func.coalesce(func.sum(Packet.size), literal_column("0")).label("used")).where(
        Packet.publisher_id == bindparam("node")
    ),
}
_PG_HEADER_READS = {name: compiled(statement) for name, statement in _HEADER_READS.items() if name != "parents"}
_PG_HEADER_READS["parents"] = compiled(
    select(Packet.id, Packet.status).where(Packet.id == any_(bindparam("parents", type_=ARRAY(String))))
)


def _header_rows(state: BrokerState, caller: Caller, manifest: Any, topic: str, blob: str) -> _HeaderRows:
    """The header check's reads: on Postgres one pipeline on the driver (every upload makes them), elsewhere
    one autocommit read session."""
    wanted: dict[str, dict[str, Any]] = {
        "key": {"fingerprint": manifest.key_fingerprint},
        "topic": {"topic": topic},
        "flagged": {},
    }
    if manifest.parents:
        wanted["parents"] = {"parents": list(manifest.parents)}
    if state.settings.node_quota_bytes:
        wanted |= {"blob_stored": {"blob": blob}, "used": {"node": caller.node_id}}
    if state.settings.is_postgres:
        statements = [(_PG_HEADER_READS[name], params) for name, params in wanted.items()]
        rows = dict(zip(wanted, read_pipeline(state.reads, statements), strict=True))
    else:
        with state.reads() as session:
            rows = {name: session.execute(_HEADER_READS[name], params).all() for name, params in wanted.items()}
    parents = [(r.id, stored_member(PacketStatus, r.status)) for r in rows.get("parents", [])]
    return _HeaderRows(
        rows["key"][0] if rows["key"] else None,
        [(pid, status) for pid, status in parents if status is not PacketStatus.accepted],
        rows["topic"][0] if rows["topic"] else None,
        bool(rows["blob_stored"][0].stored) if "blob_stored" in rows else False,
        int(rows["used"][0].used) if "used" in rows else 0,
        _flagged_sets(rows["flagged"], state.settings.flagged_similarity),
    )


def _check_header(state: BrokerState, caller: Caller, topic: str, stream: StreamingPacket, blob: str) -> _Checked:
    """Everything decidable from the header: topic, storable text, key (known, live, the caller's),
    quota, signature; and, read with them, the flagged concept sets the safety check uses once the
    concepts have arrived. ``blob`` is the blob key, which names exactly this file."""
    header = stream.header
    assert header is not None
    manifest = header.manifest
    if manifest.topic != topic:
        raise ValidationFailed(
            f"the packet is signed for topic {manifest.topic!r} but was sent to {topic!r}", code="topic_mismatch"
        )
    _check_storable(header.manifest.model_dump(mode="json"))
    if manifest.teacher.node is not None and manifest.teacher.node != caller.node:
        raise ValidationFailed(
            f"the packet's signed manifest names teacher node {manifest.teacher.node!r}, but {caller.node!r} "
            "uploaded it; publish it as that node, or pack it with that node's name",
            code="teacher_node_mismatch",
        )
    fingerprint = manifest.key_fingerprint
    rows = _header_rows(state, caller, manifest, topic, blob)
    key = rows.key
    if key is None:
        raise ValidationFailed(
            f"key {fingerprint[:16]}… is not registered here; register it with POST /v1/keys",
            code="unknown_key",
        )
    if key.revoked_at is not None:
        raise ValidationFailed(f"key {fingerprint[:16]}… was revoked", code="key_revoked")
    if key.owner_id != caller.node_id:  # admins too: an admin publishes with its own keys
        with state.reads() as session:
            owner = session.scalar(select(Node.name).where(Node.id == key.owner_id))
        raise ValidationFailed(
            f"key {fingerprint[:16]}… belongs to node {owner!r}, not to {caller.node!r}",
            code="key_not_owned",
        )
    _refuse_withdrawn_parents(rows.withdrawn_parents)
    if rows.topic is None:  # this upload would create the topic
        with state.reads() as session:
            check_topic_quota(session, caller, topic, state.settings.max_topics_per_node)
    _check_quota(state, caller, header.file_size, rows)
    threshold = rows.topic.safety_threshold if rows.topic is not None else None
    topic_id = rows.topic.id if rows.topic is not None else None
    check_signature(header, VerifyKey.from_raw(base64.b64decode(key.public_key)))
    default = state.settings.safety_threshold
    return _Checked(fingerprint, threshold if threshold is not None else default, topic_id, rows.flagged)


def _refuse_withdrawn_parents(withdrawn: list[tuple[str, PacketStatus]]) -> None:
    """422 when a parent on this broker is withdrawn (revoked or quarantined): a packet cannot claim to
    descend from knowledge its publisher or an admin took back. A parent this broker does not hold
    stays allowed (lineage across brokers) and is shown as ``known: false``; a parent withdrawn later
    keeps its edges, so its descendants can be found and rolled back."""
    if withdrawn:
        pid, status = withdrawn[0]
        raise ValidationFailed(
            f"parent {pid[:16]}… is {status.value}; a packet cannot descend from a withdrawn one",
            code="parent_withdrawn",
        )


def _check_quota(state: BrokerState, caller: Caller, size: int, rows: _HeaderRows) -> None:
    """413 when this packet would take the node's stored bytes over its quota.

    Only re-uploading this very file (same blob key: same header and data bytes) is free: it stores
    nothing new. A new packet sharing another's data section, or another node's bytes, counts in full.
    Concurrent uploads by one node may each pass and together overshoot by at most their own sizes."""
    quota = state.settings.node_quota_bytes
    if not quota or rows.blob_stored:
        return
    if rows.used + size > quota:
        raise TooLarge(
            f"node {caller.node!r} stores {rows.used} bytes of packets; this one ({size} bytes) would exceed its quota "
            f"of {quota} bytes — ask an admin to raise M2KT_NODE_QUOTA_BYTES or remove old packets",
            code="quota_exceeded",
        )


def _check_storable(value: object, where: str = "manifest") -> None:
    """422 for a NUL character anywhere in the manifest's text (keys or values): Postgres cannot store
    one in JSON, so it is refused on every database alike, before anything is staged."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValidationFailed(
                f"{where} contains a NUL character (U+0000), which the broker cannot store; remove it and sign again",
                code="nul_in_manifest",
            )
    elif isinstance(value, dict):
        for name, item in value.items():
            _check_storable(name, where)
            _check_storable(item, f"{where}.{str(name)[:40]}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_storable(item, f"{where}[{i}]")


def _check_rate(state: BrokerState, caller: Caller) -> None:
    wait = state.uploads.take(caller.node_id)
    if wait:
        raise TooManyRequests(
            f"node {caller.node!r} is over its upload rate ({state.settings.upload_rate_per_minute:g}/min, "
            f"burst {state.settings.upload_burst}); retry in {wait:.1f} s",
            code="rate_limited",
            headers={"Retry-After": state.uploads.retry_after(wait)},
        )


class _Receiver:
    """One upload's bytes, fed in order from worker threads, one batch at a time.

    Bytes before the end of the header are kept (a few KiB, at most the header limit plus a batch);
    once the header is checked, staging starts under the final key and everything goes to it.
    A lock keeps close() (abort) from running while a batch is still being fed."""

    def __init__(self, state: BrokerState, caller: Caller, topic: str, stream: StreamingPacket) -> None:
        self.state = state
        self.caller = caller
        self.topic = topic
        self.stream = stream
        self.checked: _Checked | None = None
        self.key: str | None = None
        self.staged: StagedUpload | None = None
        self.promoted = False
        self.closed = False
        self._early: list[bytes] = []
        self._lock = threading.Lock()

    def feed(self, chunk: bytes) -> None:
        with self._lock:
            header = self.stream.feed(chunk)
            if self.staged is not None:
                self.staged.write(chunk)
                return
            self._early.append(chunk)
            if header is None:
                return
            assert self.stream.header_sha256 is not None
            key = blob_key(header.manifest.data_sha256, self.stream.header_sha256)
            self.checked = _check_header(self.state, self.caller, self.topic, self.stream, key)
            self.key = key
            self.staged = self.state.storage.stage(self.key)
            early, self._early = self._early, []
            for piece in early:
                self.staged.write(piece)

    def close(self) -> None:
        """Stop the hashing helper and, unless the blob was promoted, abort the staged upload (once)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._early = []
            self.stream.close()
            if self.staged is not None and not self.promoted:
                try:
                    self.staged.abort()
                except StorageError:
                    pass  # an unfinished multipart upload or a file in incoming/: garbage collection removes it


def _flagged_sets(rows: Sequence[Any], default: float) -> list[FlaggedSet]:
    """The flagged concept sets' rows (name, labels, directions, threshold), ready for the safety check."""
    out = []
    for row in rows:
        directions = unit_rows(np.asarray(row.directions, dtype=np.float64))
        out.append(
            FlaggedSet(row.name, row.labels, directions, row.threshold if row.threshold is not None else default)
        )
    return out


def _safety(received: Received, checked: _Checked) -> SafetyReport:
    report = declared_safety(received.header, checked.threshold)
    flagged_similarity(report, received.header, received.concepts, checked.flagged)
    return report


@dataclass
class _Commit:
    """What the commit transaction writes for one upload, and the record it answers with."""

    row: dict[str, Any]  # the packet row but its topic_id, which each try of the transaction finds (or creates)
    parents: list[str]
    record: PacketOut
    inline: bytes | None = None  # the packet's bytes, when the transaction writes them too (inline blobs)


def _commit_plan(receiver: _Receiver, received: Received, report: SafetyReport, status: PacketStatus) -> _Commit:
    caller, checked, key = receiver.caller, receiver.checked, receiver.key
    assert checked is not None and key is not None
    verdict = {
        "verdict": "pass" if report.passed else "flagged",
        "action": "accepted" if status is PacketStatus.accepted else "quarantined",
        "threshold": report.threshold,
        "declared_max": report.declared_max,
        "over_threshold": report.over_threshold,
        "flagged": report.flagged,
    }
    manifest = received.header.manifest
    row = {
        "id": received.packet_id,
        "publisher_id": caller.node_id,
        "key_fingerprint": checked.key_fingerprint,
        "size": received.size,
        "data_sha256": manifest.data_sha256,
        "manifest": manifest.model_dump(mode="json"),
        "safety": verdict,
        "status": status,
        "storage_key": key,
        "created_at": utcnow(),
    }
    record = PacketOut(  # from what the transaction writes: no read back
        id=row["id"],
        topic=receiver.topic,
        publisher=caller.node,
        key_fingerprint=checked.key_fingerprint,
        size=received.size,
        data_sha256=manifest.data_sha256,
        status=status,
        safety=SafetyVerdict.model_validate(verdict),
        parents=sorted(manifest.parents),
        created_at=row["created_at"],
        manifest=row["manifest"],
    )
    return _Commit(row, list(manifest.parents), record)


def _promote(state: BrokerState, receiver: _Receiver, plan: _Commit) -> None:
    """Make the staged blob visible under its final key (S3: complete the upload; local: rename it). An inline
    blob needs nothing here: the transaction wrote it with its row."""
    staged, key = receiver.staged, receiver.key
    assert staged is not None and key is not None
    if plan.inline is not None:
        receiver.promoted = True
    elif not receiver.promoted:
        staged.complete()  # S3: the object appears under its final key, nothing is copied
        if staged.staging_key != key:  # local: a rename out of incoming/
            state.storage.promote(staged.staging_key, key)
        receiver.promoted = True


def _topic_id(session: Session, receiver: _Receiver) -> int:
    """The topic the header check found, or — rare — the one this transaction creates (or finds created)."""
    assert receiver.checked is not None
    if receiver.checked.topic_id is not None:
        return receiver.checked.topic_id
    return get_or_create_topic(session, receiver.topic, receiver.caller.node_id).id


def _finish_commit(
    state: BrokerState, session: Session, receiver: _Receiver, plan: _Commit, topic_id: int
) -> tuple[PacketOut, bool]:
    """The row is written, not committed: only now does the blob appear (a refusal before leaves no blob; a
    failure after rolls the row back, and a blob without a row is garbage collection's). Then the event,
    which locks the topic row until commit, goes with the COMMIT."""
    _promote(state, receiver, plan)
    row, caller = plan.row, receiver.caller
    if row["status"] is PacketStatus.accepted:
        append_event_and_commit(session, topic_id, receiver.topic, EventKind.published, row["id"])
    else:
        audit.record(session, caller.node_id, "packet.quarantined_on_upload", row["id"], safety=row["safety"])
    return plan.record, True


def _commit_portable(state: BrokerState, receiver: _Receiver, plan: _Commit) -> tuple[PacketOut, bool]:
    """The commit transaction statement by statement (SQLite, the embedded default)."""
    row = plan.row
    with locked_transaction(state.sessions, row["storage_key"]) as session:
        existing = session.get(Packet, row["id"])
        if existing is not None:  # stored before: return it as it is
            return packet_out(session, existing), False
        _recheck_publisher(session, receiver.caller, row["key_fingerprint"])
        topic_id = _topic_id(session, receiver)
        try:  # Core inserts: the ORM's unit of work costs more than the statement here
            session.execute(insert(Packet), [{**row, "topic_id": topic_id}])  # the row before the edges to it
            if plan.parents:
                session.execute(insert(LineageEdge), [{"parent_id": p, "child_id": row["id"]} for p in plan.parents])
            if plan.inline is not None:
                session.execute(upsert(postgres=False), upsert_values(row["storage_key"], plan.inline))
        except DataError as exc:
            raise _unstorable(exc) from None
        return _finish_commit(state, session, receiver, plan, topic_id)


_PACKET_COLUMNS = [column.name for column in Packet.__table__.columns]
_PG_LOCK = compiled(select(func.pg_advisory_xact_lock(bindparam("lock"))))
_PG_STORED = compiled(select(Packet.id).where(Packet.id == bindparam("id")))
# The publisher's key still live, and its row locked until the commit (see _recheck_publisher).
_KEY_LIVE = (
    update(PublicKey)
    .where(PublicKey.fingerprint == bindparam("signed_by"), PublicKey.revoked_at.is_(None))
    .values(owner_id=PublicKey.owner_id)
)
_PG_KEY_LIVE = compiled(_KEY_LIVE)
_PG_INSERT_PACKET = compiled(
    pg_insert(Packet).values({name: bindparam(name) for name in _PACKET_COLUMNS}).on_conflict_do_nothing()
)
_PG_UPSERT_INLINE = compiled(upsert(postgres=True))
_PG_INSERT_EDGE = compiled(
    pg_insert(LineageEdge)
    .values(parent_id=bindparam("parent_id"), child_id=bindparam("child_id"))
    .on_conflict_do_nothing()
)


class _StoredBefore(Exception):
    """The packet's row exists: this upload's transaction is rolled back, and the stored record returned."""


def _stored_record(state: BrokerState, packet_id: str) -> PacketOut:
    with state.reads() as session:
        existing = session.get(Packet, packet_id)
        assert existing is not None
        return packet_out(session, existing)


def _commit_postgres(state: BrokerState, receiver: _Receiver, plan: _Commit) -> tuple[PacketOut, bool]:
    """The commit transaction in two round trips: one pipeline takes the blob's lock, asks whether the packet
    is stored, re-checks the publisher's key and token and writes the row and its edges; after the blob is
    promoted, the event goes with the COMMIT (:func:`append_event_and_commit`). A packet stored before (its
    insert did nothing) or a refusal rolls the whole transaction back."""
    row, caller = plan.row, receiver.caller
    with state.sessions.begin() as session:
        topic_id = _topic_id(session, receiver)
        values = {name: row[name] for name in _PACKET_COLUMNS if name != "topic_id"} | {"topic_id": topic_id}
        values |= {"manifest": Jsonb(row["manifest"]), "safety": Jsonb(row["safety"]), "status": row["status"].name}
        connection, raw = driver_connection(session)
        try:
            with driver_errors(connection, raw, _PG_INSERT_PACKET), raw.pipeline():
                raw.execute(_PG_LOCK, {"lock": blob_lock_id(row["storage_key"])})
                stored = raw.execute(_PG_STORED, {"id": row["id"]})
                live = raw.execute(_PG_KEY_LIVE, {"signed_by": row["key_fingerprint"]})
                token = raw.cursor(row_factory=namedtuple_row)
                token.execute(TOKEN_BY_ID_SQL, {"token_id": caller.token_id})
                raw.execute(_PG_INSERT_PACKET, values)
                if plan.parents:
                    edges = [{"parent_id": p, "child_id": row["id"]} for p in plan.parents]
                    raw.cursor().executemany(_PG_INSERT_EDGE, edges)
                if plan.inline is not None:
                    raw.execute(_PG_UPSERT_INLINE, upsert_values(row["storage_key"], plan.inline))
        except DataError as exc:
            raise _unstorable(exc) from None
        if stored.fetchone() is not None:  # stored before: nothing was written; roll back, return it as it is
            raise _StoredBefore
        if live.rowcount != 1:
            raise _revoked_meanwhile(row["key_fingerprint"])
        refuse_unusable(token.fetchone(), datetime.now(UTC))
        return _finish_commit(state, session, receiver, plan, topic_id)


def _store_and_commit(
    state: BrokerState,
    receiver: _Receiver,
    received: Received,
    report: SafetyReport,
    status: PacketStatus,
) -> tuple[PacketOut, bool]:
    """Make the staged blob visible and commit its row, holding the blob's lock throughout (so garbage
    collection cannot delete it in between); returns (record, created). A packet stored before is
    returned as it is, and this upload's staged copy is left for close() to abort."""
    plan = _commit_plan(receiver, received, report, status)
    assert receiver.staged is not None
    plan.inline = receiver.staged.take_for_database()  # a small packet with inline blobs: written with its row
    commit = _commit_postgres if state.settings.is_postgres else _commit_portable
    for attempt in range(2):
        try:
            return commit(state, receiver, plan)
        except _StoredBefore:
            return _stored_record(state, plan.row["id"]), False
        except IntegrityError:
            if attempt:  # the same packet committed concurrently: the second try returns it
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _unstorable(exc: DataError) -> ValidationFailed:
    """A value this database cannot store: refused, and nothing staged stays."""
    reason = str(exc.orig or exc).splitlines()[0][:200]
    return ValidationFailed(f"the packet cannot be stored: {reason}", code="invalid_value")


def _revoked_meanwhile(fingerprint: str) -> ValidationFailed:
    return ValidationFailed(f"key {fingerprint[:16]}… was revoked during the upload", code="key_revoked")


def _finish_and_store(
    state: BrokerState, receiver: _Receiver, stream: StreamingPacket
) -> tuple[Received, PacketOut, bool]:
    """The body has arrived: finish its checks (digests, finiteness), apply the safety policy, store and
    commit. Returns (what was received, the record, whether it was created)."""
    received = stream.finish()
    assert receiver.checked is not None, "finish() returns only after the header"
    report = _safety(received, receiver.checked)
    status = PacketStatus.accepted
    if not report.passed:
        if state.settings.safety_action == "reject":
            what = (
                f"declared safety scores at or over {report.threshold}: {report.over_threshold[:5]}"
                if report.over_threshold
                else f"concepts near flagged directions: {[(f['concept'], f['label']) for f in report.flagged[:5]]}"
            )
            code = "safety_declared" if report.over_threshold else "safety_flagged"
            raise ValidationFailed(f"refused by the safety policy: {what}", code=code)
        status = PacketStatus.quarantined
    record, created = _store_and_commit(state, receiver, received, report, status)
    return received, record, created


def _recheck_publisher(session: Session, caller: Caller, fingerprint: str) -> None:
    """Where the row is committed, again: the key is still live, the token and node still valid.

    The conditional UPDATE locks the key's row (Postgres) or takes the write lock (SQLite) until this
    transaction ends, so a revocation either commits first (and this upload is refused, 422
    ``key_revoked``) or waits and then revokes this packet with the key's others — never a packet
    signed by a revoked key committed after its revocation."""
    live = session.execute(
        _KEY_LIVE, {"signed_by": fingerprint}, execution_options={"synchronize_session": False}
    ).rowcount
    if live != 1:
        raise _revoked_meanwhile(fingerprint)
    refuse_unusable(token_state(session, ApiToken.id == caller.token_id), datetime.now(UTC))


def upload_incomplete() -> Malformed:
    """The refusal of an upload whose client disconnected before the body ended."""
    return Malformed("the client disconnected before the upload finished", code="upload_incomplete")


async def _chunks(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Re-chunk the request body into ~BATCH-sized pieces (fresh bytes objects, copied once)."""
    parts: list[bytes] = []
    size = 0
    async for part in body:
        if part:
            parts.append(part)
            size += len(part)
        if size >= BATCH:
            yield parts[0] if len(parts) == 1 else b"".join(parts)
            parts, size = [], 0
    if parts:
        yield parts[0] if len(parts) == 1 else b"".join(parts)


async def _receive(receiver: _Receiver, body: AsyncIterator[bytes], content_length: int | None) -> bytes:
    """Feed the body to ``receiver`` in a worker thread, one batch at a time and in order, while the
    next batch is read from the request. A body declared to fit one batch is not fed here but returned:
    the caller feeds it in the worker-thread call that finishes the upload, so a small packet costs one hop
    to a worker thread instead of three. A longer (or undeclared) body is fed as it arrives, so its header
    is checked, and staging starts, as soon as the first batch is in. Returns ``b""`` when all was fed."""
    limiter = receiver.state.upload_threads
    job: asyncio.Future[None] | None = None
    held: bytes | None = None  # a one-batch body, until its end shows it is one
    streaming = content_length is None or content_length > BATCH
    try:
        async for chunk in _chunks(body):
            if not streaming and held is None:
                held = chunk
                continue
            batches = [held, chunk] if held is not None else [chunk]
            held, streaming = None, True
            for batch in batches:
                if job is not None:
                    await job
                job = asyncio.ensure_future(in_limited_thread(limiter, receiver.feed, batch))
        if job is not None:
            await job
    finally:
        # When reading the body failed, the batch being fed no longer matters: receiver.close() waits for it.
        if job is not None:
            if job.done():
                _ = job.cancelled() or job.exception()  # retrieved (it may be the error being raised)
            else:
                job.add_done_callback(lambda done: done.cancelled() or done.exception())
    return held or b""


def _feed_finish_and_store(
    state: BrokerState, receiver: _Receiver, stream: StreamingPacket, last: bytes
) -> tuple[Received, PacketOut, bool]:
    """The last batch, the checks that need the whole body, storing and committing, and closing the receiver:
    one worker-thread call (each hop between the event loop and a worker costs more than a small packet's
    checks do)."""
    try:
        if last:
            receiver.feed(last)
        return _finish_and_store(state, receiver, stream)
    finally:
        receiver.close()


async def receive_packet(
    state: BrokerState, caller: Caller, topic: str, body: AsyncIterator[bytes], content_length: int | None
) -> tuple[PacketOut, bool]:
    """Stream, validate and store one upload; returns (record, created).

    The route has checked the topic's name and that ``caller`` may publish to it (``PublishCaller``); ``body``
    raises :func:`upload_incomplete` when the client goes away mid-upload.
    A storage or database failure propagates as it is; the app's handler answers 503 for it."""
    settings = state.settings
    _check_rate(state, caller)
    if content_length is not None and content_length > settings.max_packet_bytes:
        raise TooLarge(
            f"{content_length} bytes is over the broker's packet limit of {settings.max_packet_bytes}",
            code="packet_too_large",
        )
    started = time.perf_counter()
    stream = StreamingPacket(
        max_packet_bytes=settings.max_packet_bytes,
        max_header_bytes=settings.max_header_bytes,
        max_concepts_bytes=settings.max_concepts_bytes,
        max_tensors=settings.max_tensor_count,
        max_manifest_bytes=settings.max_manifest_bytes,
    )
    receiver = _Receiver(state, caller, topic, stream)
    try:
        last = await _receive(receiver, body, content_length)
        received, record, created = await in_limited_thread(
            state.upload_threads, _feed_finish_and_store, state, receiver, stream, last
        )
    except BrokerError as exc:
        if exc.status in (400, 413, 422):
            state.metrics.validation_failures.labels(exc.code).inc()
            await in_thread(
                audit.record_separately,
                state.sessions,
                caller.node_id,
                "packet.refused",
                topic,
                code=exc.code,
                message=exc.message[:500],
            )
        raise
    finally:
        if not receiver.closed:  # the body failed before the last call: abort what was staged
            await in_thread(receiver.close)
    state.metrics.bytes_in.inc(received.size)
    state.metrics.packets_accepted.labels(record.status.value).inc()
    state.metrics.upload_seconds.observe(time.perf_counter() - started)
    return record, created
