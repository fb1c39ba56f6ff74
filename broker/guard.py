"""Request guard, in front of routing: what can be refused before a byte of the body is read.

* ``/v1/…`` without ``Authorization: Bearer …`` → 401 ``missing_token`` at once (FastAPI would
  otherwise read and parse a JSON body first, and answer a broken one with 422);
* request bodies of every route but the packet upload are capped (``max_json_body_bytes``):
  413 ``body_too_large`` from ``Content-Length``, or as soon as a chunked body passes the cap.

Plain ASGI, so the streamed upload's body passes straight through.
"""

from __future__ import annotations

import json
import re
from typing import Any

from m2kt.broker.services.auth import missing_token

UPLOAD_PATH = re.compile(r"^/v1/topics/[^/]+/packets/?$")


async def _send_error(send: Any, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"code": code, "message": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


class RequestGuard:
    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
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
            await _send_error(send, 413, "body_too_large", self._message())
            return
        await self._capped(scope, receive, send)

    def _message(self) -> str:
        return f"the request body is over the broker's limit of {self.max_body_bytes} bytes for this route"

    async def _capped(self, scope: Any, receive: Any, send: Any) -> None:
        """Read the (small) body first, refusing it once it passes the cap; then replay it to the app.

        An exception raised from ``receive`` would not do: FastAPI turns errors while reading a body
        into a 400 of its own."""
        buffered: list[Any] = []
        seen = 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break  # the client went away: let the app see it
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                await _send_error(send, 413, "body_too_large", self._message())
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Any:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)
