"""One error base with an HTTP status and a stable code; one handler renders ``{"code", "message"}``.

Services raise these (``PacketNotFound``, ``Forbidden`` …), never ``HTTPException``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

from client.packet import PacketError

log = logging.getLogger("m2kt.broker")

# FastAPI's detail when a JSON body cannot be decoded at all (e.g. invalid UTF-8); malformed JSON text
# is a RequestValidationError (422) instead.
_FASTAPI_BODY_NOT_PARSED = "There was an error parsing the body"


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
    status, code = 503, "dependency_unavailable"


# Packet refusals that are about size: 413, so a client can tell "too big" from "broken".
SIZE_CODES = frozenset({"header_too_large", "manifest_too_large", "too_many_tensors", "data_too_large"})


def from_packet_error(exc: PacketError) -> BrokerError:
    """Over a size limit: 413; other malformed packet files: 400; well-formed packets that fail a check: 422."""
    if exc.code in SIZE_CODES:
        return TooLarge(exc.message, code=exc.code)
    cls = Malformed if exc.kind == "malformed" else ValidationFailed
    return cls(exc.message, code=exc.code)


def _body(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting the error shape for these statuses."""
    described = {
        400: "Malformed request or packet file",
        401: "Missing, unknown, expired or revoked token",
        403: "The token's role or scopes do not allow this",
        404: "No such resource",
        409: "Conflicts with existing state",
        413: "Too large",
        416: "Range not satisfiable",
        422: "Failed validation (digest, signature, key, topic, safety policy)",
        429: "Too many uploads from this node; retry after the Retry-After header's seconds",
        503: "A dependency (database or storage) is unavailable",
    }
    return {s: {"model": ErrorBody, "description": described[s]} for s in statuses}


async def _refused_token(request: Request) -> JSONResponse | None:
    """The 401 for this request's bearer token, or None when the token is good."""
    from starlette.concurrency import run_in_threadpool

    from broker.deps import authenticate, get_state

    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    try:
        await run_in_threadpool(authenticate, get_state(request), token.strip() if scheme.lower() == "bearer" else None)
    except BrokerError as exc:
        return JSONResponse(_body(exc.code, exc.message), status_code=exc.status, headers=exc.headers)
    return None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BrokerError)
    async def _broker_error(_: Request, exc: BrokerError) -> JSONResponse:
        return JSONResponse(_body(exc.code, exc.message), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            # FastAPI parses a JSON body before it runs the auth dependency: a bad token still comes first.
            refused = await _refused_token(request)
            if refused is not None:
                return refused
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse(_body("invalid_request", f"{where}: {first.get('msg', 'invalid')}"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == _FASTAPI_BODY_NOT_PARSED:
            # A JSON body that is not even UTF-8: the same answer as for one that is not JSON (422),
            # after the token's.
            refused = await _refused_token(request)
            if refused is not None:
                return refused
            return JSONResponse(_body("invalid_request", "body: not valid UTF-8 JSON"), status_code=422)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(DataError)
    async def _unstorable(request: Request, exc: DataError) -> JSONResponse:
        # The database refused a value from the request (too long, out of range, a NUL character):
        # a request the edge validation should have refused. Answer 422, not 500, and say so in the log.
        reason = str(exc.orig or exc).splitlines()[0][:200]
        log.warning("database refused a request value on %s %s: %s", request.method, request.url.path, reason)
        return JSONResponse(_body("invalid_value", f"a value in the request cannot be stored: {reason}"), 422)
