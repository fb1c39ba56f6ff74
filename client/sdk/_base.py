"""What the sync and async clients share: configuration, retry decisions, error responses."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

from m2kt.errors import M2KTError, PermissionDenied, TransportError, error_from_response
from m2kt.format.keys import VerifyKey
from m2kt.sdk.calls import Call
from m2kt.sdk.config import load_config
from m2kt.sdk.retry import RETRY_STATUSES, RetryPolicy, parse_retry_after

__all__ = ["CHUNK", "PathLike", "ClientBase", "error_of", "packet_path", "skippable"]

CHUNK = 1 << 20
PathLike = str | os.PathLike[str]


def resolve(base_url: str | None, token: str | None, profile: str | None = None) -> tuple[str, str | None]:
    if base_url is None or token is None:
        config = load_config(profile)
        base_url = base_url or config.url
        token = token if token is not None else config.token
    if not base_url:
        raise M2KTError("no broker URL: pass base_url, set M2KT_URL, or run `m2kt login URL --token …`")
    return base_url.rstrip("/"), token


def packet_path(source: Any) -> Path:
    """A path from a path, a WrittenPacket, or an opened Packet."""
    path = getattr(source, "path", source)
    if path is None:
        raise TypeError("publish needs a packet file; write the packet first (m2kt.format.write_packet)")
    return Path(path)


def error_of(response: httpx.Response) -> M2KTError:
    try:
        body = response.json()
    except ValueError:
        body = None
    return error_from_response(response.status_code, body, parse_retry_after(response.headers.get("retry-after")))


def skippable(exc: M2KTError) -> bool:
    """A packet withdrawn between its event and our fetch: deliver the event without a file."""
    return isinstance(exc, PermissionDenied) and exc.code in ("packet_revoked", "packet_quarantined")


class ClientBase:
    def __init__(
        self,
        base_url: str | None,
        token: str | None,
        *,
        retry: RetryPolicy | None,
        trusted_fingerprints: set[str] | frozenset[str] | None,
        prefer_redirect: bool,
        quiet: bool,
        fsync: bool = False,
    ) -> None:
        self.base_url, self._token = resolve(base_url, token)
        self.fsync = fsync
        self.retry = retry or RetryPolicy()
        self.trusted = frozenset(trusted_fingerprints) if trusted_fingerprints is not None else None
        self.prefer_redirect = prefer_redirect
        self.quiet = quiet
        self._keys: dict[str, VerifyKey] = {}
        self._headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def _request_kwargs(self, call: Call[Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"params": call.params}
        if call.json is not None:
            kwargs["json"] = call.json
        if call.timeout is not None:
            kwargs["timeout"] = httpx.Timeout(call.timeout, connect=10)
        return kwargs

    def _retryable(self, call_idempotent: bool, attempt: int, exc: M2KTError) -> float | None:
        """Seconds to wait before retrying, or None to give up."""
        if not call_idempotent or attempt + 1 >= self.retry.attempts:
            return None
        if isinstance(exc, TransportError):
            return self.retry.delay(attempt)
        status = getattr(exc, "status", 0)
        if status in RETRY_STATUSES:
            return self.retry.delay(attempt, getattr(exc, "retry_after", None))
        return None
