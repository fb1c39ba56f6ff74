"""Request guard, in front of routing: what can be refused before a byte of the body is read.

* a credential in the query string (a parameter named like ``token`` / ``access_token`` / ``api_key``,
  or any value shaped like an API token) → 400 ``token_in_query``, on every path, before anything
  else looks at the request: URLs end up in logs, proxies and browser histories, so the caller is
  told to send ``Authorization: Bearer …`` and to rotate the token;
* ``/v1/…`` without ``Authorization: Bearer …`` → 401 ``missing_token`` at once (FastAPI would
  otherwise read and parse a JSON body first, and answer a broken one with 422);
* request bodies of every route but the packet upload are capped (``max_json_body_bytes``):
  413 ``body_too_large`` from ``Content-Length``, or as soon as a chunked body passes the cap (after
  the token is checked: a bad token gets its 401 first, whatever the body's size); such a
  body not complete ``body_idle_timeout`` seconds after the request head → 408 ``body_stalled``.

Plain ASGI, so the streamed upload's body passes straight through.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any
from urllib.parse import parse_qsl

from m2kt.broker.errors import DATABASE_FAILURES, BrokerError, dependency_down
from m2kt.broker.logredact import is_credential_name, looks_like_token
from m2kt.broker.services.auth import authenticate, missing_token
from m2kt.broker.stalls import body_stalled
from m2kt.broker.storage import StorageError
from m2kt.broker.threads import in_thread

UPLOAD_PATH = re.compile(r"^/v1/topics/[^/]+/packets/?$")


async def _send_error(send: Any, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"code": code, "message": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


TOKEN_IN_QUERY = (
    "do not put API tokens in the URL: send the token in the header 'Authorization: Bearer m2kt_…' instead. "
    "A token sent in a URL may have been recorded by proxies, browser history or logs on the way: "
    "rotate it now (POST /v1/me/token with the header gives a new secret and revokes this one)"
)


def credential_in_query(query_string: bytes) -> str | None:
    """The name of the first query parameter that carries a credential (by its name or its value), or None."""
    if not query_string:
        return None
    text = query_string.decode("latin-1")
    for name, value in parse_qsl(text, keep_blank_values=True, encoding="latin-1"):
        if is_credential_name(name) or looks_like_token(value) or looks_like_token(name):
            return name
    return None


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


async def token_refusal(scope: dict[str, Any]) -> BrokerError | None:
    """The refusal this request's bearer token gets — 401 when unknown, expired, revoked or disabled, 503
    when the database cannot say — or None when it is good. Shared with the app's error handlers."""
    state = scope["app"].state.broker
    scheme, _, token = (_header(scope, b"authorization") or "").partition(" ")
    try:
        await in_thread(authenticate, state.reads, token.strip() if scheme.lower() == "bearer" else None)
    except BrokerError as exc:
        return exc
    except (StorageError, *DATABASE_FAILURES) as exc:
        return dependency_down(exc)
    return None


class RequestGuard:
    def __init__(self, app: Any, max_body_bytes: int, body_idle_timeout: float = 30.0) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_idle_timeout = body_idle_timeout

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if credential_in_query(scope.get("query_string", b"")) is not None:
            await _send_error(send, 400, "token_in_query", TOKEN_IN_QUERY, {"Cache-Control": "no-store"})
            return
        path: str = scope.get("path", "")
        if path.startswith("/v1/"):
            auth = _header(scope, b"authorization") or ""
            scheme, _, credentials = auth.partition(" ")
            if scheme.lower() != "bearer" or not credentials.strip():
                refusal = missing_token()
                await _send_error(send, refusal.status, refusal.code, refusal.message, refusal.headers)
                return
        if scope["method"] == "POST" and UPLOAD_PATH.match(path):
            await self.app(scope, receive, send)  # packets have their own, much larger, limits
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(scope, send)
            return
        await self._capped(scope, receive, send)

    async def _too_large(self, scope: Any, send: Any) -> None:
        """413, but a bad token's 401 first: a stranger learns nothing about limits, nor about routes."""
        if scope.get("path", "").startswith("/v1/"):
            refusal = await token_refusal(scope)
            if refusal is not None:
                await _send_error(send, refusal.status, refusal.code, refusal.message, refusal.headers)
                return
        await _send_error(send, 413, "body_too_large", self._message())

    def _message(self) -> str:
        return f"the request body is over the broker's limit of {self.max_body_bytes} bytes for this route"

    async def _capped(self, scope: Any, receive: Any, send: Any) -> None:
        """Read the (small) body first, refusing it once it passes the cap; then replay it to the app.

        An exception raised from ``receive`` would not do: FastAPI turns errors while reading a body
        into a 400 of its own."""
        buffered: list[Any] = []
        seen = 0
        try:
            # The whole (small) body, not each piece: a byte every few seconds must not hold a connection.
            async with asyncio.timeout(self.body_idle_timeout):
                while True:
                    message = await receive()
                    buffered.append(message)
                    if message["type"] != "http.request":
                        break  # the client went away: let the app see it
                    seen += len(message.get("body", b""))
                    if seen > self.max_body_bytes or not message.get("more_body", False):
                        break
        except TimeoutError:
            stalled = body_stalled(self.body_idle_timeout)
            await _send_error(send, stalled.status, stalled.code, stalled.message, stalled.headers)
            return
        if seen > self.max_body_bytes:
            await self._too_large(scope, send)
            return

        async def replay() -> Any:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)
