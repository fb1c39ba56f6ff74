"""Online garbage collection: remove blobs that no committed row points to, once they are old enough.

Uploads promote a blob before they commit its row (so a row never points at a missing blob); a
crash, a dropped database connection or a refused commit between the two leaves a blob without a
row, and a crash mid-upload leaves a staged upload (a file under ``incoming/`` or an unfinished S3
multipart upload). This module removes both once older than ``grace_seconds`` — and never a blob
that a committed row points to: each candidate is re-checked and deleted while holding the blob
key's lock (:mod:`m2kt.broker.bloblocks`), which an upload holds from making its blob visible until its
row commits; a blob whose lock is busy is skipped.

Safe to run from several brokers at once (deleting twice is harmless) and while uploads go on.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from m2kt.broker.bloblocks import try_locked_transaction
from m2kt.broker.models import Packet
from m2kt.broker.storage import BlobStore, StorageError

log = logging.getLogger("m2kt.broker.gc")

PACKET_PREFIX = "packets/"


@dataclass
class GcReport:
    """What one collection saw and did."""

    dry_run: bool
    grace_seconds: float
    scanned: int = 0  # blobs under packets/
    referenced: int = 0  # kept: a committed row points at them
    young: int = 0  # kept: no row yet, but younger than the grace period
    busy: int = 0  # kept: an upload holds the blob's lock (committing its row right now)
    deleted: list[str] = field(default_factory=list)  # orphan blobs removed (or that would be, in a dry run)
    deleted_bytes: int = 0
    unfinished_seen: int = 0  # staged uploads found
    unfinished_discarded: int = 0  # ... and removed (older than the grace period)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_referenced(session: Session, key: str) -> bool:
    return session.scalar(select(Packet.id).where(Packet.storage_key == key).limit(1)) is not None


def _delete_unless_referenced(
    sessions: sessionmaker[Session], storage: BlobStore, key: str, dry_run: bool
) -> Literal["deleted", "referenced", "busy"]:
    with try_locked_transaction(sessions, key) as session:
        if session is None:
            return "busy"
        if _is_referenced(session, key):  # committed since the listing
            return "referenced"
        if not dry_run:
            storage.delete(key)
        return "deleted"


def collect_garbage(
    sessions: sessionmaker[Session],
    storage: BlobStore,
    grace_seconds: float,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
) -> GcReport:
    """Delete orphan packet blobs and abandoned staged uploads older than ``grace_seconds``."""
    started = datetime.now(UTC)
    now = now or started
    cutoff = now - timedelta(seconds=grace_seconds)
    report = GcReport(dry_run=dry_run, grace_seconds=grace_seconds)

    # List first, then read the keys rows point to: a row committed after the listing points at a
    # blob promoted shortly before it, which is young and so kept anyway.
    blobs = list(storage.list(PACKET_PREFIX))
    with sessions() as session:
        referenced = set(session.scalars(select(Packet.storage_key)))
    report.scanned = len(blobs)
    for blob in blobs:
        if blob.key in referenced:
            report.referenced += 1
            continue
        if blob.modified > cutoff:
            report.young += 1
            continue
        try:
            outcome = _delete_unless_referenced(sessions, storage, blob.key, dry_run)
        except StorageError as exc:
            report.errors.append(f"{blob.key}: {exc}")
            continue
        if outcome == "deleted":
            report.deleted.append(blob.key)
            report.deleted_bytes += blob.size
        elif outcome == "referenced":
            report.referenced += 1
        else:
            report.busy += 1

    for upload in storage.unfinished_uploads():
        report.unfinished_seen += 1
        if upload.started > cutoff:
            continue
        try:
            if not dry_run:
                storage.discard_unfinished(upload)
        except StorageError as exc:
            report.errors.append(f"{upload.key} (unfinished): {exc}")
            continue
        report.unfinished_discarded += 1

    report.seconds = (datetime.now(UTC) - started).total_seconds()
    if report.deleted or report.unfinished_discarded or report.errors:
        log.warning(
            "gc%s: %d orphan blobs (%d bytes) and %d unfinished uploads removed, %d errors",
            " (dry run)" if dry_run else "",
            len(report.deleted),
            report.deleted_bytes,
            report.unfinished_discarded,
            len(report.errors),
        )
    return report
