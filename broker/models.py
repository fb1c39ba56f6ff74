"""SQLAlchemy 2 models: the broker's provenance. The schema changes only through migrations/."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JSONType = JSON().with_variant(JSONB(), "postgresql")
# SQLite has no 64-bit autoincrement other than INTEGER PRIMARY KEY.
BigID = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC) if value is not None else None


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Role(enum.StrEnum):
    teacher = "teacher"
    student = "student"
    admin = "admin"


class PacketStatus(enum.StrEnum):
    accepted = "accepted"
    quarantined = "quarantined"
    revoked = "revoked"


class EventKind(enum.StrEnum):
    published = "published"  # a packet became available on the topic (upload, or release from quarantine)
    revoked = "revoked"  # its key was revoked: stop using it
    quarantined = "quarantined"  # an admin withdrew it pending review


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(cls, name=name, native_enum=False, length=16, validate_strings=True)


class Node(Base):
    __tablename__ = "nodes"
    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[Role] = mapped_column(_enum(Role, "role"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ApiToken(Base):
    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the secret
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, to tell tokens apart in listings
    scopes: Mapped[list[str]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    node: Mapped[Node] = relationship(lazy="joined")


class PublicKey(Base):
    __tablename__ = "public_keys"
    fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("nodes.id"), index=True)
    public_key: Mapped[str] = mapped_column(String(64))  # base64 of the raw 32 bytes
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_reason: Mapped[str | None] = mapped_column(Text)
    owner: Mapped[Node] = relationship(lazy="joined")


class Topic(Base):
    __tablename__ = "topics"
    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    safety_threshold: Mapped[float | None] = mapped_column(Float)  # None: the broker's default
    last_seq: Mapped[int] = mapped_column(BigInteger, default=0)  # row-locked to order events
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[int | None] = mapped_column(ForeignKey("nodes.id"))


class Packet(Base):
    __tablename__ = "packets"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the file
    topic_id: Mapped[int] = mapped_column(ForeignKey("topics.id"), index=True)
    publisher_id: Mapped[int] = mapped_column(ForeignKey("nodes.id"), index=True)
    key_fingerprint: Mapped[str] = mapped_column(ForeignKey("public_keys.fingerprint"), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    data_sha256: Mapped[str] = mapped_column(String(64))
    manifest: Mapped[dict[str, Any]] = mapped_column(JSONType)
    safety: Mapped[dict[str, Any]] = mapped_column(JSONType)  # the broker's verdict and its reasons
    status: Mapped[PacketStatus] = mapped_column(_enum(PacketStatus, "packet_status"), index=True)
    storage_key: Mapped[str] = mapped_column(String(300), index=True)  # GC and quota look blobs up by it
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    topic: Mapped[Topic] = relationship(lazy="joined")
    publisher: Mapped[Node] = relationship(lazy="joined")


class LineageEdge(Base):
    """parent -> child. The parent may be unknown to this broker (published elsewhere)."""

    __tablename__ = "lineage_edges"
    parent_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    child_id: Mapped[str] = mapped_column(ForeignKey("packets.id", ondelete="CASCADE"), primary_key=True)
    __table_args__ = (Index("ix_lineage_edges_child_id", "child_id"),)


class TopicEvent(Base):
    """The ordered log subscribers read: per topic, seq increases in commit order."""

    __tablename__ = "topic_events"
    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    topic_id: Mapped[int] = mapped_column(ForeignKey("topics.id"))
    seq: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[EventKind] = mapped_column(_enum(EventKind, "event_kind"))
    packet_id: Mapped[str] = mapped_column(ForeignKey("packets.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    packet: Mapped[Packet] = relationship(lazy="joined")
    __table_args__ = (UniqueConstraint("topic_id", "seq", name="uq_topic_events_topic_seq"),)


class Subscription(Base):
    __tablename__ = "subscriptions"
    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    topic_id: Mapped[int] = mapped_column(ForeignKey("topics.id"))
    cursor: Mapped[int] = mapped_column(BigInteger, default=0)  # last acknowledged seq
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    topic: Mapped[Topic] = relationship(lazy="joined")
    __table_args__ = (UniqueConstraint("node_id", "name", name="uq_subscriptions_node_name"),)


class IngestionReceipt(Base):
    __tablename__ = "ingestion_receipts"
    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    packet_id: Mapped[str] = mapped_column(ForeignKey("packets.id", ondelete="CASCADE"), index=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id"))
    decision: Mapped[str] = mapped_column(String(32))  # accepted | rolled_back
    scores: Mapped[dict[str, Any]] = mapped_column(JSONType)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    node: Mapped[Node] = relationship(lazy="joined")


class FlaggedConceptSet(Base):
    """Admin-registered concept directions the broker refuses (or quarantines) packets near."""

    __tablename__ = "flagged_concept_sets"
    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    d_model: Mapped[int] = mapped_column(Integer)
    labels: Mapped[list[str]] = mapped_column(JSONType)
    directions: Mapped[list[list[float]]] = mapped_column(JSONType)
    threshold: Mapped[float | None] = mapped_column(Float)  # None: the broker's default
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AuditEvent(Base):
    """Append-only: admin and security events. Nothing updates or deletes these rows."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    actor_id: Mapped[int | None] = mapped_column(ForeignKey("nodes.id"))
    action: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str | None] = mapped_column(String(200))
    detail: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)


class InlineBlob(Base):
    """A small packet's bytes, kept in the database instead of the blob store (``M2KT_INLINE_BLOB_MAX_BYTES``;
    :mod:`m2kt.broker.storage.database`). Keyed like a blob in the store: packets point at it by storage_key."""

    __tablename__ = "inline_blobs"
    key: Mapped[str] = mapped_column(String(300), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    modified: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
