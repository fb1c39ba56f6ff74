"""API tokens: minted once, stored as sha256, scoped, expiring, revocable.

Scopes: ``admin`` (everything), ``read`` (list, fetch, subscribe), ``receipt`` (post ingestion
receipts), ``keys`` (register own public keys), and ``publish:<pattern>`` (upload to topics
matching the shell-style pattern, e.g. ``publish:arith.*``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import secrets
from collections.abc import Iterable

from m2kt.broker.models import Role

TOKEN_PREFIX = "m2kt_"

DEFAULT_SCOPES: dict[Role, list[str]] = {
    Role.admin: ["admin"],
    Role.teacher: ["read", "keys", "publish:*"],
    Role.student: ["read", "receipt", "keys"],
}


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def valid_scope(scope: str) -> bool:
    if scope in ("admin", "read", "receipt", "keys"):
        return True
    return scope.startswith("publish:") and 0 < len(scope) - len("publish:") <= 128


def allows(scopes: Iterable[str], needed: str, topic: str | None = None) -> bool:
    """Whether ``scopes`` grant ``needed`` ('read', 'receipt', 'keys', 'publish', 'admin')."""
    scopes = list(scopes)
    if "admin" in scopes:
        return True
    if needed == "publish":
        return topic is not None and any(
            s.startswith("publish:") and fnmatch.fnmatchcase(topic, s.removeprefix("publish:")) for s in scopes
        )
    return needed in scopes
