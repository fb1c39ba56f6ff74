"""One error base with an HTTP status and a stable code; :mod:`m2kt.broker.handlers` renders
``{"code", "message"}``.

Services raise these (``NotFound``, ``Forbidden`` …), never ``HTTPException``; this module knows no FastAPI.
A dependency that fails — storage or the database — is one 503 each, built in one place
(:func:`dependency_down`): ``storage_unavailable`` and ``database_unavailable``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from m2kt.broker.storage import StorageError
from m2kt.errors import PacketError

#: What counts as the database being down (connection refused or lost, pool exhausted).
DATABASE_FAILURES = (OperationalError, PoolTimeout)


class ErrorBody(BaseModel):
    code: str
    message: str


class BrokerError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = headers


class Malformed(BrokerError):
    status, code = 400, "malformed"


class Unauthorized(BrokerError):
    status, code = 401, "unauthorized"


class Forbidden(BrokerError):
    status, code = 403, "forbidden"


class NotFound(BrokerError):
    status, code = 404, "not_found"


class Conflict(BrokerError):
    status, code = 409, "conflict"


class TooLarge(BrokerError):
    status, code = 413, "too_large"


class RangeNotSatisfiable(BrokerError):
    status, code = 416, "range_not_satisfiable"


class ValidationFailed(BrokerError):
    status, code = 422, "validation_failed"


class TooManyRequests(BrokerError):
    status, code = 429, "rate_limited"


class DependencyDown(BrokerError):
    """Storage or the database is unavailable; built by :func:`dependency_down`."""

    status, code = 503, "dependency_unavailable"


# Packet refusals that are about size: 413, so a client can tell "too big" from "broken".
SIZE_CODES = frozenset({"header_too_large", "manifest_too_large", "too_many_tensors", "data_too_large"})


def from_packet_error(exc: PacketError) -> BrokerError:
    """Over a size limit: 413; other malformed packet files: 400; well-formed packets that fail a check: 422."""
    if exc.code in SIZE_CODES:
        return TooLarge(exc.message, code=exc.code)
    cls = Malformed if exc.kind == "malformed" else ValidationFailed
    return cls(exc.message, code=exc.code)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting the error shape for these statuses."""
    described = {
        400: "Malformed request or packet file",
        401: "Missing, unknown, expired or revoked token",
        403: "The token's role or scopes do not allow this",
        404: "No such resource",
        408: "The request body stopped arriving (M2KT_BODY_IDLE_TIMEOUT_SECONDS)",
        409: "Conflicts with existing state",
        413: "Too large",
        416: "Range not satisfiable",
        422: "Failed validation (digest, signature, key, topic, safety policy)",
        429: "Too many uploads or streams from this node at once, or over its upload rate; retry after Retry-After",
        503: "A dependency (database or storage) is unavailable",
    }
    return {s: {"model": ErrorBody, "description": described[s]} for s in statuses}


def storage_unavailable(exc: BaseException) -> DependencyDown:
    return DependencyDown(f"storage is unavailable: {exc}", code="storage_unavailable")


def database_unavailable(exc: BaseException) -> DependencyDown:
    return DependencyDown(
        f"the database is unavailable: {getattr(exc, 'orig', None) or exc}", code="database_unavailable"
    )


def dependency_down(exc: BaseException) -> DependencyDown | None:
    """The 503 for a storage or database failure (one code each); None for any other exception."""
    if isinstance(exc, StorageError):
        return storage_unavailable(exc)
    if isinstance(exc, DATABASE_FAILURES):
        return database_unavailable(exc)
    return None
