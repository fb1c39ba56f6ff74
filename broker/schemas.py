"""Request and response models of the broker's REST API (what /docs shows)."""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, model_validator

from m2kt.broker.models import EventKind, PacketStatus, Role

NAME_PATTERN = r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,99}$"
MAX_BIGINT = (1 << 63) - 1  # sequence numbers, cursors and ids are 64-bit columns
MAX_NAME_LENGTH = 100  # the name columns of nodes, subscriptions and flagged sets
_UNSTORABLE_TEXT = re.compile(r"[\x00\ud800-\udfff]")


def check_storable(value: Any) -> None:
    """Raise ValueError for what the database cannot store: text with NUL characters or lone surrogates
    (Postgres text and JSONB refuse both) and non-finite numbers (JSON has no NaN or Infinity).

    Walks nested lists and dicts (keys too) without recursion, however deep the request's JSON is."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _UNSTORABLE_TEXT.search(item):
                raise ValueError("text must not contain NUL characters or unpaired surrogates")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError("numbers must be finite (no NaN or Infinity)")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


def storable_name(name: str, max_length: int = MAX_NAME_LENGTH) -> bool:
    """Whether a name from a URL path fits its column (subscriptions, flagged sets): 1-100 characters, no NUL."""
    return 0 < len(name) <= max_length and "\x00" not in name


class _In(BaseModel):
    """A request body: everything in it must be storable as it is (see :func:`check_storable`).

    Numbers are strict (``StrictInt`` / ``StrictFloat``): ``true`` or ``"5"`` is not a number, as the
    OpenAPI schema says, though an integer is a valid float."""

    model_config = ConfigDict(allow_inf_nan=False)

    @model_validator(mode="after")
    def _storable(self) -> Self:
        for _, value in self:
            check_storable(value)
        return self


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class NodeCreate(_In):
    name: str = Field(pattern=NAME_PATTERN, description="Unique node name, e.g. 'teacher-a'.")
    role: Role
    scopes: list[str] | None = Field(default=None, description="Token scopes; default by role (see /docs intro).")
    token_ttl_days: StrictInt | None = Field(default=None, gt=0, le=3650)


class NodeOut(_Out):
    name: str
    role: Role
    created_at: datetime
    disabled_at: datetime | None = None


class TokenCreate(_In):
    scopes: list[str] | None = None
    ttl_days: StrictInt | None = Field(default=None, gt=0, le=3650)


class TokenRotate(_In):
    ttl_days: StrictInt | None = Field(
        default=None, gt=0, le=3650, description="Default and maximum: the lifetime the rotated token was issued with."
    )


class TokenOut(BaseModel):
    id: int
    node: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None = None
    token: str | None = Field(default=None, description="The secret: shown once, at creation.")


class NodeWithToken(BaseModel):
    node: NodeOut
    token: TokenOut


class WhoAmI(BaseModel):
    node: str
    role: Role
    scopes: list[str]
    token_expires_at: datetime | None


class KeyRegister(_In):
    public_key: str = Field(description="Ed25519 public key: PEM (SubjectPublicKeyInfo) or base64 of the raw 32 bytes.")
    owner: str | None = Field(default=None, description="Admins may register a key for another node.")
    signed_at: int | None = Field(
        default=None, ge=0, le=MAX_BIGINT, description="When the proof was signed (Unix seconds)."
    )
    proof: str | None = Field(
        default=None,
        max_length=200,
        description="Proof of possession: base64 of the key's Ed25519 signature over its registration statement "
        "for the owner node (m2kt.format.key_proof; the SDK and `m2kt key register` make it).",
    )


class KeyRevoke(_In):
    reason: str | None = Field(default=None, max_length=1000)


class KeyOut(BaseModel):
    fingerprint: str
    owner: str
    public_key: str = Field(description="base64 of the raw 32-byte public key")
    created_at: datetime
    revoked_at: datetime | None
    revoked_reason: str | None = None


class KeyRevoked(BaseModel):
    key: KeyOut
    packets_revoked: int


class TopicOut(BaseModel):
    name: str
    safety_threshold: float | None
    effective_safety_threshold: float
    last_seq: int
    packets: int
    created_at: datetime


class TopicUpdate(_In):
    safety_threshold: StrictFloat | None = Field(ge=0.0, le=1.0)


class FlaggedHit(BaseModel):
    concept: str
    set: str
    label: str
    similarity: float


class SafetyVerdict(BaseModel):
    verdict: Literal["pass", "flagged"]
    action: Literal["accepted", "quarantined"]
    threshold: float
    declared_max: float
    over_threshold: list[str] = Field(default_factory=list, description="Concepts whose declared score is too high.")
    flagged: list[FlaggedHit] = Field(default_factory=list, description="Concepts near admin-flagged directions.")


class PacketOut(BaseModel):
    id: str
    topic: str
    publisher: str
    key_fingerprint: str
    size: int
    data_sha256: str
    status: PacketStatus
    safety: SafetyVerdict
    parents: list[str]
    created_at: datetime
    manifest: dict[str, Any]


class EventOut(BaseModel):
    seq: int
    kind: EventKind
    at: datetime
    packet: PacketOut


class EventPage(BaseModel):
    items: list[EventOut]
    cursor: int = Field(description="Pass as ?after= to continue; the last seq returned, or the given one.")


class SubscriptionCreate(_In):
    topic: str


class SubscriptionOut(BaseModel):
    name: str
    topic: str
    cursor: int
    created_at: datetime
    updated_at: datetime


class AckIn(_In):
    cursor: StrictInt = Field(
        ge=0, le=MAX_BIGINT, description="The last seq handled; the cursor never moves backwards."
    )


class LineageNode(BaseModel):
    id: str
    depth: int
    known: bool = Field(description="False when the packet is not stored on this broker.")
    topic: str | None = None
    status: PacketStatus | None = None


class LineageOut(BaseModel):
    packet: str
    ancestors: list[LineageNode]
    descendants: list[LineageNode]


class ReceiptIn(_In):
    decision: Literal["accepted", "rolled_back"]
    scores: dict[str, StrictFloat] = Field(default_factory=dict)
    report: dict[str, Any] | None = None


class ReceiptOut(BaseModel):
    id: int
    packet_id: str
    node: str
    decision: str
    scores: dict[str, float]
    report: dict[str, Any] | None
    created_at: datetime


class FlaggedSetIn(_In):
    d_model: StrictInt = Field(gt=0, le=1 << 16)
    labels: list[str] = Field(min_length=1, max_length=10_000)
    directions: list[list[StrictFloat]] = Field(min_length=1, max_length=10_000)
    threshold: StrictFloat | None = Field(default=None, ge=-1.0, le=1.0)


class FlaggedSetOut(BaseModel):
    name: str
    d_model: int
    labels: list[str]
    threshold: float | None
    created_at: datetime


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str | None
    action: str
    target: str | None
    detail: dict[str, Any]


class StatsOut(BaseModel):
    packets: dict[str, int]
    bytes_stored: int
    topics: int
    nodes: dict[str, int]
    keys: dict[str, int]
    receipts: dict[str, int]
    subscriptions: int
    storage: str = Field(description="Where blobs are stored (admins only; /readyz does not say).")
    process: int = Field(
        description="The process id of the broker process that answered (with --workers, one of several)."
    )


class GcOut(BaseModel):
    """One garbage collection: what was scanned, kept and removed."""

    dry_run: bool
    grace_seconds: float
    scanned: int = Field(description="Blobs under packets/.")
    referenced: int = Field(description="Kept: a committed row points at them.")
    young: int = Field(description="Kept: no row, but younger than the grace period.")
    busy: int = Field(description="Kept: an upload is committing its row right now.")
    deleted: list[str] = Field(description="Orphan blobs removed (or that would be, in a dry run).")
    deleted_bytes: int
    unfinished_seen: int = Field(description="Staged uploads found (incoming/ files, unfinished S3 multipart uploads).")
    unfinished_discarded: int
    errors: list[str]
    seconds: float
