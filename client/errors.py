"""Every error M2KT raises is an ``M2KTError``; this module is the whole tree and imports nothing::

    M2KTError
    ├── PacketError               a packet was refused: ``.code`` (stable), ``.message``, ``.kind``
    │   ├── PacketFormatError     the bytes are not a well-formed packet (structure, limits, encoding)
    │   └── VerificationError     a well-formed packet failed a check, wherever it was checked: digest,
    │                             signature, unknown / revoked / untrusted key, id, NaN or Inf
    │                             (``m2kt.format``, ``BrokerClient.fetch``, ``ingest``)
    ├── KeyFileError              a key file is missing, unreadable, too permissive or not Ed25519
    ├── SpecError                 a packet spec (or a model it names) cannot be run
    ├── IngestError               a packet and an ingestion config or student do not fit together
    ├── DemoError                 a step of ``m2kt demo`` failed
    ├── TransportError            the broker could not be reached, or timed out (after retries)
    └── BrokerError               the broker answered with an error (``.status``, ``.code``, ``.message``)
        ├── MalformedRequest      400
        ├── AuthError             401: missing, unknown, expired or revoked token
        ├── PermissionDenied      403: role or scopes do not allow it; packet quarantined or revoked
        ├── NotFound              404
        ├── Conflict              409
        ├── TooLarge              413
        ├── ValidationError       422: the broker refused the packet (``.code`` says why)
        ├── RateLimited           429 (retried, honouring Retry-After, before it is raised)
        └── ServiceUnavailable    5xx (retried for idempotent calls before it is raised)

The packet, key-file, spec and ingestion errors are also ``ValueError`` s, as they were before
this tree existed. Nothing unverified is ever left where a failed fetch or ingestion was writing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "AuthError",
    "BrokerError",
    "Conflict",
    "DemoError",
    "IngestError",
    "KeyFileError",
    "M2KTError",
    "MalformedRequest",
    "NotFound",
    "PacketError",
    "PacketFormatError",
    "PermissionDenied",
    "RateLimited",
    "ServiceUnavailable",
    "SpecError",
    "TooLarge",
    "TransportError",
    "ValidationError",
    "VerificationError",
    "error_from_response",
]


class M2KTError(Exception):
    """Base of every M2KT error."""


# ----------------------------------------------------------------------------- packets


class PacketError(M2KTError, ValueError):
    """A packet was refused. ``code`` is stable and machine-readable; the message is for people.

    ``kind`` says which half of the tree: ``malformed`` (the broker answers 400) or ``invalid`` (422).
    """

    kind: Literal["malformed", "invalid"] = "invalid"

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


class PacketFormatError(PacketError):
    """The bytes are not a well-formed M2KT packet (structure, limits, encoding)."""

    kind = "malformed"


class VerificationError(PacketError):
    """A well-formed packet failed a check: digest, signature, key, id, or tensor content."""

    kind = "invalid"


class KeyFileError(M2KTError, ValueError):
    """A key file is missing, unreadable, too permissive, or not an Ed25519 key."""

    def __init__(self, path: str | os.PathLike[str] | None, reason: str) -> None:
        self.path = None if path is None else Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}" if path is not None else reason)


# ----------------------------------------------------------------------------- models


class SpecError(M2KTError, ValueError):
    """A spec (or a model, layer or token it names) that cannot be run; the message says which and why."""


class IngestError(M2KTError, ValueError):
    """The packet and the config or student do not fit together (nothing was changed)."""


class DemoError(M2KTError):
    """A step of the demo failed; the message says which and why."""


# ----------------------------------------------------------------------------- the broker, over HTTP


class TransportError(M2KTError):
    """The broker could not be reached or did not answer in time."""


class BrokerError(M2KTError):
    """The broker refused a request: ``status`` (HTTP), ``code`` (stable), ``message`` (for people)."""

    status = 0

    def __init__(self, status: int, code: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class MalformedRequest(BrokerError):
    pass


class AuthError(BrokerError):
    pass


class PermissionDenied(BrokerError):
    pass


class NotFound(BrokerError):
    pass


class Conflict(BrokerError):
    pass


class TooLarge(BrokerError):
    pass


class ValidationError(BrokerError):
    pass


class RateLimited(BrokerError):
    pass


class ServiceUnavailable(BrokerError):
    pass


_BY_STATUS: dict[int, type[BrokerError]] = {
    400: MalformedRequest,
    401: AuthError,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    422: ValidationError,
    429: RateLimited,
}


def error_from_response(status: int, body: Any, retry_after: float | None = None) -> BrokerError:
    """Build the exception for an error response (``body``: the parsed JSON, if any)."""
    code, message = "http_error", f"HTTP {status}"
    if isinstance(body, dict):
        code = str(body.get("code", code))
        message = str(body.get("message", message))
    cls = _BY_STATUS.get(status, ServiceUnavailable if status >= 500 else BrokerError)
    return cls(status, code, message, retry_after=retry_after)
