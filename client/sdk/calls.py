"""The broker's API as plain request descriptions: no I/O here, so the sync and async clients
share every path, parameter and response model and differ only in how they send."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import TypeAdapter

from m2kt.errors import KeyFileError, VerificationError
from m2kt.format.key_proof import KeyProof, prove_key
from m2kt.format.keys import SigningKey, VerifyKey, load_signing_key, parse_verify_key
from m2kt.sdk.records import (
    EventPage,
    KeyRecord,
    KeyRevocation,
    Lineage,
    NodeWithToken,
    PacketRecord,
    Receipt,
    SubscriptionRecord,
    TokenRecord,
    TopicRecord,
    WhoAmI,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    model: Any  # a pydantic model or type accepted by TypeAdapter; None: no body expected
    params: dict[str, Any] | None = None
    json: Any = None
    idempotent: bool = True  # safe to retry: GETs, PUTs, content-addressed or monotonic POSTs
    timeout: float | None = None  # overrides the client's read timeout (long-polls)

    def parse(self, payload: Any) -> T:
        if self.model is None:
            return None  # type: ignore[return-value]
        return TypeAdapter(self.model).validate_python(payload)  # type: ignore[no-any-return]


def _q(segment: str) -> str:
    from urllib.parse import quote

    return quote(segment, safe="")


def me() -> Call[WhoAmI]:
    return Call("GET", "/v1/me", WhoAmI)


#: Items per page of the broker's list routes (topics, keys); a shorter page is the last one.
PAGE = 1000


def topics(after: str | None = None) -> Call[list[TopicRecord]]:
    """One page of topics by name, after the name ``after``."""
    params: dict[str, Any] = {"limit": PAGE}
    if after is not None:
        params["after"] = after
    return Call("GET", "/v1/topics", list[TopicRecord], params=params)


def events(topic: str, after: int = 0, wait: float = 0, limit: int = 100) -> Call[EventPage]:
    return Call(
        "GET",
        f"/v1/topics/{_q(topic)}/packets",
        EventPage,
        params={"after": after, "wait": wait, "limit": limit},
        timeout=wait + 30 if wait else None,
    )


def packet(packet_id: str) -> Call[PacketRecord]:
    return Call("GET", f"/v1/packets/{_q(packet_id)}", PacketRecord)


def lineage(packet_id: str) -> Call[Lineage]:
    return Call("GET", f"/v1/packets/{_q(packet_id)}/lineage", Lineage)


def key(fingerprint: str) -> Call[KeyRecord]:
    return Call("GET", f"/v1/keys/{_q(fingerprint)}", KeyRecord)


def keys(owner: str | None = None, after: str | None = None) -> Call[list[KeyRecord]]:
    """One page of the key registry, oldest first, after the fingerprint ``after``."""
    params: dict[str, Any] = {"limit": PAGE}
    if owner is not None:
        params["owner"] = owner
    if after is not None:
        params["after"] = after
    return Call("GET", "/v1/keys", list[KeyRecord], params=params)


def register_key(proof: KeyProof, owner: str | None = None) -> Call[KeyRecord]:
    body = {"public_key": proof.public_key, "owner": owner, "signed_at": proof.signed_at, "proof": proof.signature}
    return Call("POST", "/v1/keys", KeyRecord, json=body)


def key_proof(key: SigningKey | KeyProof | str | os.PathLike[str], node: Callable[[], str]) -> KeyProof:
    """The proof of possession that registers ``key``: made here from a private key (``SigningKey`` or
    its ``NAME.key`` file) for the node ``node()`` names, or a ``KeyProof`` a node made (``m2kt key prove``)."""
    if isinstance(key, KeyProof):
        return key
    if isinstance(key, VerifyKey):
        raise KeyFileError(
            None, "registering a key needs its private key (it signs the registration; only the signature is sent)"
        )
    signing = key if isinstance(key, SigningKey) else load_signing_key(key)
    return prove_key(signing, node())


def revoke_key(fingerprint: str, reason: str | None = None) -> Call[KeyRevocation]:
    return Call("POST", f"/v1/keys/{_q(fingerprint)}/revoke", KeyRevocation, json={"reason": reason})


def delete_key(fingerprint: str) -> Call[None]:
    # Sent once: a retry after a lost answer would report 404 for a key that was dropped.
    return Call("DELETE", f"/v1/keys/{_q(fingerprint)}", None, idempotent=False)


def create_node(
    name: str, role: str, scopes: list[str] | None = None, ttl_days: int | None = None
) -> Call[NodeWithToken]:
    return Call(
        "POST",
        "/v1/nodes",
        NodeWithToken,
        json={"name": name, "role": role, "scopes": scopes, "token_ttl_days": ttl_days},
        idempotent=False,
    )


def issue_token(node: str, scopes: list[str] | None = None, ttl_days: int | None = None) -> Call[TokenRecord]:
    return Call(
        "POST",
        f"/v1/nodes/{_q(node)}/tokens",
        TokenRecord,
        json={"scopes": scopes, "ttl_days": ttl_days},
        idempotent=False,
    )


def set_status(packet_id: str, action: str) -> Call[PacketRecord]:
    return Call("POST", f"/v1/packets/{_q(packet_id)}/{action}", PacketRecord)


def receipt(
    packet_id: str, decision: str, scores: dict[str, float] | None, report: dict[str, Any] | None
) -> Call[Receipt]:
    return Call(
        "POST",
        f"/v1/packets/{_q(packet_id)}/receipts",
        Receipt,
        json={"decision": decision, "scores": scores or {}, "report": report},
        idempotent=False,
    )


def receipts(packet_id: str) -> Call[list[Receipt]]:
    return Call("GET", f"/v1/packets/{_q(packet_id)}/receipts", list[Receipt])


def publish(topic: str, size: int) -> tuple[Call[PacketRecord], dict[str, str]]:
    """The upload of a ``size``-byte packet file (the body is streamed by the client) and its headers.

    Safe to retry: the broker stores a packet under its digest, so the same bytes give the same record."""
    call: Call[PacketRecord] = Call(
        "POST", f"/v1/topics/{_q(topic)}/packets", PacketRecord, idempotent=True, timeout=max(300.0, size / 1e6)
    )
    return call, {"Content-Type": "application/octet-stream", "Content-Length": str(size)}


def ensure_subscription(name: str, topic: str) -> Call[SubscriptionRecord]:
    return Call("PUT", f"/v1/subscriptions/{_q(name)}", SubscriptionRecord, json={"topic": topic})


def subscription_events(name: str, wait: float, limit: int) -> Call[EventPage]:
    return Call(
        "GET",
        f"/v1/subscriptions/{_q(name)}/packets",
        EventPage,
        params={"wait": wait, "limit": limit},
        timeout=wait + 30,
    )


def ack(name: str, cursor: int) -> Call[SubscriptionRecord]:
    # The cursor only moves forward on the broker, so repeating an ack is harmless.
    return Call("POST", f"/v1/subscriptions/{_q(name)}/ack", SubscriptionRecord, json={"cursor": cursor})


# ----------------------------------------------------------------------------- verification helpers


def verify_key_from_record(record: KeyRecord, trusted: frozenset[str] | None) -> VerifyKey:
    """The key a packet must verify against: registered, not revoked, and pinned if a pin set is given."""
    if record.revoked_at is not None:
        raise VerificationError("key_revoked", f"key {record.fingerprint[:16]}… was revoked at {record.revoked_at}")
    if trusted is not None and record.fingerprint not in trusted:
        raise VerificationError("untrusted_key", f"key {record.fingerprint[:16]}… is not in the pinned trusted set")
    key = parse_verify_key(record.public_key)
    if key.fingerprint != record.fingerprint:
        raise VerificationError("key_mismatch", "the broker's key registry returned a key with another fingerprint")
    return key


def destination(packet_id: str, dest: str | os.PathLike[str]) -> Path:
    """``dest`` itself, or ``dest/<id>.m2kt`` when it is a directory (or ends with a separator)."""
    path = Path(dest)
    if path.is_dir() or str(dest).endswith(("/", os.sep)):
        path.mkdir(parents=True, exist_ok=True)
        return path / f"{packet_id}.m2kt"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def temporary_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.{secrets.token_hex(6)}.part")
