"""Every error the SDK raises is an ``M2KTError``::

M2KTError
├── TransportError            the broker could not be reached, or timed out (after retries)
├── VerificationError         a packet failed local verification (``.code``: digest_mismatch,
│                             signature_invalid, id_mismatch, key_revoked, untrusted_key, …);
│                             nothing unverified is ever left at the destination
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
"""

from __future__ import annotations

from typing import Any


class M2KTError(Exception):
    """Base of every SDK error."""


class TransportError(M2KTError):
    """The broker could not be reached or did not answer in time."""


class VerificationError(M2KTError):
    """A packet failed verification on this machine."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


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
