"""The app's exception handlers: every refusal is ``{"code", "message"}`` with its status.

* :class:`~m2kt.broker.errors.BrokerError` — as it says;
* storage and database failures, wherever they surface — 503 ``storage_unavailable`` /
  ``database_unavailable`` (:func:`~m2kt.broker.errors.dependency_down`; nothing converts them by hand);
* FastAPI's own request validation and HTTP errors — the same shape, after a bad token's 401;
* a value the database refuses (too long, a NUL) — 422 ``invalid_value``;
* a unique or foreign-key constraint a concurrent request won — 409 ``conflict`` (the create-or-get
  paths resolve their own races with :func:`~m2kt.broker.services.upsert.insert_or_find`; this is the
  net under everything else, so no race answers a bare 500).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, IntegrityError
from starlette.exceptions import HTTPException as StarletteHTTPException

from m2kt.broker.errors import DATABASE_FAILURES, BrokerError, dependency_down
from m2kt.broker.guard import token_refusal
from m2kt.broker.storage import StorageError

__all__ = ["install_error_handlers"]

log = logging.getLogger("m2kt.broker")

# FastAPI's detail when a JSON body cannot be decoded at all (e.g. invalid UTF-8); malformed JSON text
# is a RequestValidationError (422) instead.
_FASTAPI_BODY_NOT_PARSED = "There was an error parsing the body"


def _body(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message}


def _render(exc: BrokerError) -> JSONResponse:
    return JSONResponse(_body(exc.code, exc.message), status_code=exc.status, headers=exc.headers)


async def _refused_token(request: Request) -> JSONResponse | None:
    """The 401 (or 503) for this request's bearer token, or None when the token is good."""
    refusal = await token_refusal(request.scope)
    return None if refusal is None else _render(refusal)


def install_error_handlers(app: FastAPI) -> None:
    """Register every handler on ``app``."""

    @app.exception_handler(BrokerError)
    async def _broker_error(_: Request, exc: BrokerError) -> JSONResponse:
        return _render(exc)

    async def _dependency_down(_: Request, exc: Exception) -> JSONResponse:
        down = dependency_down(exc)
        assert down is not None, f"not a dependency failure: {exc!r}"
        return _render(down)

    for failure in (StorageError, *DATABASE_FAILURES):
        app.add_exception_handler(failure, _dependency_down)

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

    @app.exception_handler(IntegrityError)
    async def _constraint(request: Request, exc: IntegrityError) -> JSONResponse:
        reason = str(exc.orig or exc).splitlines()[0][:200]
        log.warning("constraint failed on %s %s: %s", request.method, request.url.path, reason)
        message = "a concurrent request changed the same record first; read it again, then retry"
        return JSONResponse(_body("conflict", message), 409)
