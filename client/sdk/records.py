"""What the broker returns, as typed records (unknown fields are ignored, for newer brokers)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from m2kt.format.manifest import Manifest


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class SafetyVerdict(_Record):
    verdict: str
    action: str
    threshold: float
    declared_max: float
    over_threshold: list[str] = []
    flagged: list[dict[str, Any]] = []


class PacketRecord(_Record):
    id: str
    topic: str
    publisher: str
    key_fingerprint: str
    size: int
    data_sha256: str
    status: Literal["accepted", "quarantined", "revoked"]
    safety: SafetyVerdict
    parents: list[str]
    created_at: datetime
    manifest: dict[str, Any]


class Event(_Record):
    seq: int
    kind: Literal["published", "revoked", "quarantined"]
    at: datetime
    packet: PacketRecord


class EventPage(_Record):
    items: list[Event]
    cursor: int


class KeyRecord(_Record):
    fingerprint: str
    owner: str
    public_key: str
    created_at: datetime
    revoked_at: datetime | None = None
    revoked_reason: str | None = None


class KeyRevocation(_Record):
    key: KeyRecord
    packets_revoked: int


class TopicRecord(_Record):
    name: str
    safety_threshold: float | None
    effective_safety_threshold: float
    last_seq: int
    packets: int
    created_at: datetime


class NodeRecord(_Record):
    name: str
    role: str
    created_at: datetime
    disabled_at: datetime | None = None


class TokenRecord(_Record):
    id: int
    node: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    token: str | None = None


class NodeWithToken(_Record):
    node: NodeRecord
    token: TokenRecord


class WhoAmI(_Record):
    node: str
    role: str
    scopes: list[str]
    token_expires_at: datetime | None = None


class SubscriptionRecord(_Record):
    name: str
    topic: str
    cursor: int
    created_at: datetime
    updated_at: datetime


class LineageNode(_Record):
    id: str
    depth: int
    known: bool
    topic: str | None = None
    status: str | None = None


class Lineage(_Record):
    packet: str
    ancestors: list[LineageNode]
    descendants: list[LineageNode]


class Receipt(_Record):
    id: int
    packet_id: str
    node: str
    decision: str
    scores: dict[str, float]
    report: dict[str, Any] | None = None
    created_at: datetime


@dataclass(frozen=True)
class FetchedPacket:
    """A packet verified on this machine and moved into place."""

    path: Path
    id: str
    manifest: Manifest  # as signed by the teacher, verified here
    key_fingerprint: str
    size: int


@dataclass(frozen=True)
class Delivery:
    """One entry of a subscription. ``path`` is the verified packet for ``published`` events;
    ``revoked`` / ``quarantined`` events tell you to stop using a packet you may already hold."""

    seq: int
    kind: Literal["published", "revoked", "quarantined"]
    record: PacketRecord
    path: Path | None = None

    @property
    def packet_id(self) -> str:
        return self.record.id
