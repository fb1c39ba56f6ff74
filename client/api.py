"""BrokerClient and AsyncBrokerClient: publish, fetch and subscribe — never handing back an
unverified packet.

Both clients send the same calls (``client._calls``) and differ only in I/O. Idempotent calls
(reads, PUTs, content-addressed uploads, monotonic acknowledgements) are retried on connection
errors, 429 and 5xx with exponential backoff and jitter, honouring ``Retry-After``; others are
sent once. Errors are the tree in ``client._exceptions``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx

from client import _calls as calls
from client._calls import Call, destination, temporary_path, verify_key_from_record
from client._config import load_config
from client._exceptions import (
    M2KTError,
    PermissionDenied,
    ServiceUnavailable,
    TransportError,
    VerificationError,
    error_from_response,
)
from client._models import (
    Delivery,
    EventPage,
    FetchedPacket,
    KeyRecord,
    KeyRevocation,
    Lineage,
    NodeWithToken,
    PacketRecord,
    Receipt,
    TokenRecord,
    TopicRecord,
    WhoAmI,
)
from client._progress import transfer_progress
from client._retry import RETRY_STATUSES, RetryPolicy, parse_retry_after
from client.keys import VerifyKey
from client.packet import PacketError, StreamVerifier, verify_signature

T = TypeVar("T")
CHUNK = 1 << 20
PathLike = str | os.PathLike[str]


def _resolve(base_url: str | None, token: str | None) -> tuple[str, str | None]:
    if base_url is None or token is None:
        config = load_config()
        base_url = base_url or config.url
        token = token if token is not None else config.token
    if not base_url:
        raise M2KTError("no broker URL: pass base_url, set M2KT_URL, or run `m2kt login URL --token …`")
    return base_url.rstrip("/"), token


def _packet_path(source: Any) -> Path:
    """A path from a path, a WrittenPacket, or an opened Packet."""
    path = getattr(source, "path", source)
    if path is None:
        raise TypeError("publish needs a packet file; write the packet first (client.packet.write_packet)")
    return Path(path)


def _error(response: httpx.Response) -> M2KTError:
    try:
        body = response.json()
    except ValueError:
        body = None
    return error_from_response(response.status_code, body, parse_retry_after(response.headers.get("retry-after")))


def _skippable(exc: M2KTError) -> bool:
    """A packet withdrawn between its event and our fetch: deliver the event without a file."""
    return isinstance(exc, PermissionDenied) and exc.code in ("packet_revoked", "packet_quarantined")


class _Base:
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
        self.base_url, self._token = _resolve(base_url, token)
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


class BrokerClient(_Base):
    """Synchronous client for an M2KT broker.

    >>> with BrokerClient("http://127.0.0.1:8000", token="m2kt_…") as broker:   # doctest: +SKIP
    ...     record = broker.publish("k.m2kt", topic="arith.mod97")
    ...     fetched = broker.fetch(record.id, "inbox/")          # verified, then moved into place
    ...     for delivery in broker.subscribe("arith.mod97", name="student-a"):
    ...         use(delivery.path)                               # acknowledged when the loop continues

    ``transport`` (an ``httpx.BaseTransport``) replaces the network, for tests. ``base_url`` and
    ``token`` default to ``M2KT_URL`` / ``M2KT_TOKEN`` or what ``m2kt login`` stored. ``fsync``
    makes fetched files durable before they are moved into place; it is off by default because a
    packet is verified again whenever it is opened for use, so a file torn by a crash is refused.
    """

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        retry: RetryPolicy | None = None,
        trusted_fingerprints: set[str] | frozenset[str] | None = None,
        prefer_redirect: bool = True,
        quiet: bool = False,
        fsync: bool = False,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(
            base_url,
            token,
            retry=retry,
            trusted_fingerprints=trusted_fingerprints,
            prefer_redirect=prefer_redirect,
            quiet=quiet,
            fsync=fsync,
        )
        self._sleep = sleep
        limits = httpx.Timeout(timeout, connect=10)
        self._http = httpx.Client(base_url=self.base_url, headers=self._headers, timeout=limits, transport=transport)
        self._plain = httpx.Client(timeout=limits, transport=transport)  # presigned URLs: no broker token

    # -- plumbing

    def close(self) -> None:
        self._http.close()
        self._plain.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(
        self, call: Call[T], *, content_factory: Callable[[], Any] | None = None, headers: dict[str, str] | None = None
    ) -> T:
        attempt = 0
        while True:
            try:
                kwargs = self._request_kwargs(call)
                if content_factory is not None:
                    kwargs["content"] = content_factory()
                response = self._http.request(call.method, call.path, headers=headers, **kwargs)
                if response.status_code >= 400:
                    raise _error(response)
                return call.parse(response.json() if response.content else None)
            except httpx.TransportError as exc:
                error: M2KTError = TransportError(f"{call.method} {call.path}: {exc!r}")
                cause: BaseException = exc
            except M2KTError as exc:
                error, cause = exc, exc
            wait = self._retryable(call.idempotent, attempt, error)
            if wait is None:
                raise error from (cause if cause is not error else None)
            self._sleep(wait)
            attempt += 1

    # -- resources

    def me(self) -> WhoAmI:
        return self._send(calls.me())

    def topics(self) -> list[TopicRecord]:
        return self._send(calls.topics())

    def events(self, topic: str, *, after: int = 0, wait: float = 0, limit: int = 100) -> EventPage:
        """The topic's log after a cursor; waits up to ``wait`` seconds for something new."""
        return self._send(calls.events(topic, after, wait, limit))

    def packet(self, packet_id: str) -> PacketRecord:
        return self._send(calls.packet(packet_id))

    def lineage(self, packet_id: str) -> Lineage:
        return self._send(calls.lineage(packet_id))

    def receipts(self, packet_id: str) -> list[Receipt]:
        """Ingestion receipts students posted for a packet."""
        return self._send(calls.receipts(packet_id))

    def key(self, fingerprint: str) -> KeyRecord:
        return self._send(calls.key(fingerprint))

    def register_key(self, public_key: VerifyKey | PathLike, owner: str | None = None) -> KeyRecord:
        return self._send(calls.register_key(public_key, owner))

    def revoke_key(self, fingerprint: str, reason: str | None = None) -> KeyRevocation:
        return self._send(calls.revoke_key(fingerprint, reason))

    def create_node(
        self, name: str, role: str, scopes: list[str] | None = None, ttl_days: int | None = None
    ) -> NodeWithToken:
        return self._send(calls.create_node(name, role, scopes, ttl_days))

    def issue_token(self, node: str, scopes: list[str] | None = None, ttl_days: int | None = None) -> TokenRecord:
        return self._send(calls.issue_token(node, scopes, ttl_days))

    def quarantine(self, packet_id: str) -> PacketRecord:
        return self._send(calls.set_status(packet_id, "quarantine"))

    def release(self, packet_id: str) -> PacketRecord:
        return self._send(calls.set_status(packet_id, "release"))

    def post_receipt(
        self,
        packet_id: str,
        decision: str,
        scores: dict[str, float] | None = None,
        report: dict[str, Any] | None = None,
    ) -> Receipt:
        return self._send(calls.receipt(packet_id, decision, scores, report))

    # -- packets

    def publish(self, packet: PathLike | Any, topic: str) -> PacketRecord:
        """Stream a packet file to the broker (never read whole); safe to retry: same bytes, same record."""
        path = _packet_path(packet)
        size = path.stat().st_size

        def body() -> Iterator[bytes]:
            with open(path, "rb") as f, transfer_progress(f"publish {path.name}", size, quiet=self.quiet) as advance:
                while chunk := f.read(CHUNK):
                    advance(len(chunk))
                    yield chunk

        call: Call[PacketRecord] = Call(
            "POST",
            f"/v1/topics/{calls._q(topic)}/packets",
            PacketRecord,
            idempotent=True,
            timeout=max(300.0, size / 1e6),
        )
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        return self._send(call, content_factory=body, headers=headers)

    def verify_key_for(self, fingerprint: str) -> VerifyKey:
        """The registered, unrevoked (and, if pinned, trusted) key with this fingerprint."""
        if fingerprint not in self._keys:
            self._keys[fingerprint] = verify_key_from_record(self.key(fingerprint), self.trusted)
        return self._keys[fingerprint]

    def fetch(self, packet_id: str, dest: PathLike) -> FetchedPacket:
        """Download, verify (id, digest, signature against the registered key, finiteness) and only
        then move into ``dest`` (a file path, or a directory for ``<id>.m2kt``)."""
        final = destination(packet_id, dest)
        attempt = 0
        while True:
            try:
                return self._download(packet_id, final)
            except httpx.TransportError as exc:
                error: M2KTError = TransportError(f"download {packet_id[:16]}…: {exc!r}")
            except ServiceUnavailable as exc:
                error = exc
            wait = self._retryable(True, attempt, error)
            if wait is None:
                raise error
            self._sleep(wait)
            attempt += 1

    def _download(self, packet_id: str, final: Path) -> FetchedPacket:
        tmp = temporary_path(final)
        verifier = StreamVerifier(expected_id=packet_id)
        key: VerifyKey | None = None
        try:
            with self._open_blob(packet_id) as response, open(tmp, "wb") as out:
                size = int(response.headers.get("content-length", 0)) or None
                with transfer_progress(f"fetch {packet_id[:12]}", size, quiet=self.quiet) as advance:
                    for chunk in response.iter_bytes(CHUNK):
                        header = verifier.feed(chunk)
                        if header is not None:  # check the signature before the body has arrived
                            key = self.verify_key_for(header.manifest.key_fingerprint)
                            verify_signature(header, key)
                        out.write(chunk)
                        advance(len(chunk))
                result = verifier.finish()
                if self.fsync:
                    out.flush()
                    os.fsync(out.fileno())
            assert key is not None
            os.replace(tmp, final)
            return FetchedPacket(final, packet_id, result.header.manifest, key.fingerprint, result.size)
        except PacketError as exc:
            raise VerificationError(exc.code, exc.message) from None
        finally:
            verifier.close()
            tmp.unlink(missing_ok=True)

    def _open_blob(self, packet_id: str) -> Any:
        from contextlib import contextmanager

        @contextmanager
        def opened() -> Iterator[httpx.Response]:
            path = f"/v1/packets/{calls._q(packet_id)}/blob"
            params = {"redirect": 1} if self.prefer_redirect else None
            request = self._http.build_request("GET", path, params=params, timeout=httpx.Timeout(300, connect=10))
            response = self._http.send(request, stream=True)
            try:
                if response.status_code == 307:
                    location = response.headers["location"]
                    response.close()
                    response = self._plain.send(self._plain.build_request("GET", location), stream=True)
                if response.status_code >= 400:
                    response.read()
                    raise _error(response)
                yield response
            finally:
                response.close()

        return opened()

    # -- subscriptions

    def subscribe(
        self,
        topic: str,
        name: str,
        *,
        dest: PathLike | None = None,
        wait: float = 25.0,
        limit: int = 50,
        once: bool = False,
    ) -> Iterator[Delivery]:
        """Verified packets of ``topic`` in order, resuming from the broker-kept cursor of ``name``.

        Each delivery is acknowledged when the loop asks for the next one — after your code has
        handled it — so a crash redelivers it (at-least-once). Connection errors and broker
        restarts are retried with backoff. ``once``: stop when nothing is waiting.
        """
        dest_dir = Path(dest) if dest is not None else Path.cwd() / "m2kt-inbox"
        dest_dir.mkdir(parents=True, exist_ok=True)
        self._send(calls.ensure_subscription(name, topic))
        failures = 0
        while True:
            try:
                page = self._send(calls.subscription_events(name, 0 if once else wait, limit))
                failures = 0
            except (TransportError, ServiceUnavailable):
                self._sleep(self.retry.delay(min(failures, 6)))
                failures += 1
                continue
            if not page.items and once:
                return
            for event in page.items:
                path = None
                if event.kind == "published":
                    try:
                        path = self.fetch(event.packet.id, dest_dir).path
                    except M2KTError as exc:
                        if not _skippable(exc):
                            raise
                yield Delivery(event.seq, event.kind, event.packet, path)
                self._send(calls.ack(name, event.seq))


class AsyncBrokerClient(_Base):
    """Asyncio client for an M2KT broker, with the same methods as :class:`BrokerClient`.

    >>> async with AsyncBrokerClient("http://127.0.0.1:8000", token="m2kt_…") as broker:  # doctest: +SKIP
    ...     record = await broker.publish("k.m2kt", topic="arith.mod97")
    ...     async for delivery in broker.subscribe("arith.mod97", name="student-a"):
    ...         use(delivery.path)
    """

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        retry: RetryPolicy | None = None,
        trusted_fingerprints: set[str] | frozenset[str] | None = None,
        prefer_redirect: bool = True,
        quiet: bool = False,
        fsync: bool = False,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        super().__init__(
            base_url,
            token,
            retry=retry,
            trusted_fingerprints=trusted_fingerprints,
            prefer_redirect=prefer_redirect,
            quiet=quiet,
            fsync=fsync,
        )
        self._sleep = sleep
        limits = httpx.Timeout(timeout, connect=10)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers, timeout=limits, transport=transport
        )
        self._plain = httpx.AsyncClient(timeout=limits, transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._plain.aclose()

    async def __aenter__(self) -> AsyncBrokerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(
        self, call: Call[T], *, content_factory: Callable[[], Any] | None = None, headers: dict[str, str] | None = None
    ) -> T:
        attempt = 0
        while True:
            try:
                kwargs = self._request_kwargs(call)
                if content_factory is not None:
                    kwargs["content"] = content_factory()
                response = await self._http.request(call.method, call.path, headers=headers, **kwargs)
                if response.status_code >= 400:
                    raise _error(response)
                return call.parse(response.json() if response.content else None)
            except httpx.TransportError as exc:
                error: M2KTError = TransportError(f"{call.method} {call.path}: {exc!r}")
                cause: BaseException = exc
            except M2KTError as exc:
                error, cause = exc, exc
            wait = self._retryable(call.idempotent, attempt, error)
            if wait is None:
                raise error from (cause if cause is not error else None)
            await self._sleep(wait)
            attempt += 1

    async def me(self) -> WhoAmI:
        return await self._send(calls.me())

    async def topics(self) -> list[TopicRecord]:
        return await self._send(calls.topics())

    async def events(self, topic: str, *, after: int = 0, wait: float = 0, limit: int = 100) -> EventPage:
        return await self._send(calls.events(topic, after, wait, limit))

    async def packet(self, packet_id: str) -> PacketRecord:
        return await self._send(calls.packet(packet_id))

    async def lineage(self, packet_id: str) -> Lineage:
        return await self._send(calls.lineage(packet_id))

    async def receipts(self, packet_id: str) -> list[Receipt]:
        return await self._send(calls.receipts(packet_id))

    async def key(self, fingerprint: str) -> KeyRecord:
        return await self._send(calls.key(fingerprint))

    async def register_key(self, public_key: VerifyKey | PathLike, owner: str | None = None) -> KeyRecord:
        return await self._send(calls.register_key(public_key, owner))

    async def revoke_key(self, fingerprint: str, reason: str | None = None) -> KeyRevocation:
        return await self._send(calls.revoke_key(fingerprint, reason))

    async def create_node(
        self, name: str, role: str, scopes: list[str] | None = None, ttl_days: int | None = None
    ) -> NodeWithToken:
        return await self._send(calls.create_node(name, role, scopes, ttl_days))

    async def issue_token(self, node: str, scopes: list[str] | None = None, ttl_days: int | None = None) -> TokenRecord:
        return await self._send(calls.issue_token(node, scopes, ttl_days))

    async def quarantine(self, packet_id: str) -> PacketRecord:
        return await self._send(calls.set_status(packet_id, "quarantine"))

    async def release(self, packet_id: str) -> PacketRecord:
        return await self._send(calls.set_status(packet_id, "release"))

    async def post_receipt(
        self,
        packet_id: str,
        decision: str,
        scores: dict[str, float] | None = None,
        report: dict[str, Any] | None = None,
    ) -> Receipt:
        return await self._send(calls.receipt(packet_id, decision, scores, report))

    async def publish(self, packet: PathLike | Any, topic: str) -> PacketRecord:
        path = _packet_path(packet)
        size = path.stat().st_size

        async def body() -> AsyncIterator[bytes]:
            with open(path, "rb") as f, transfer_progress(f"publish {path.name}", size, quiet=self.quiet) as advance:
                while chunk := await asyncio.to_thread(f.read, CHUNK):
                    advance(len(chunk))
                    yield chunk

        call: Call[PacketRecord] = Call(
            "POST",
            f"/v1/topics/{calls._q(topic)}/packets",
            PacketRecord,
            idempotent=True,
            timeout=max(300.0, size / 1e6),
        )
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        return await self._send(call, content_factory=body, headers=headers)

    async def verify_key_for(self, fingerprint: str) -> VerifyKey:
        if fingerprint not in self._keys:
            self._keys[fingerprint] = verify_key_from_record(await self.key(fingerprint), self.trusted)
        return self._keys[fingerprint]

    async def fetch(self, packet_id: str, dest: PathLike) -> FetchedPacket:
        final = destination(packet_id, dest)
        attempt = 0
        while True:
            try:
                return await self._download(packet_id, final)
            except httpx.TransportError as exc:
                error: M2KTError = TransportError(f"download {packet_id[:16]}…: {exc!r}")
            except ServiceUnavailable as exc:
                error = exc
            wait = self._retryable(True, attempt, error)
            if wait is None:
                raise error
            await self._sleep(wait)
            attempt += 1

    async def _download(self, packet_id: str, final: Path) -> FetchedPacket:
        tmp = temporary_path(final)
        verifier = StreamVerifier(expected_id=packet_id)
        key: VerifyKey | None = None
        path = f"/v1/packets/{calls._q(packet_id)}/blob"
        params = {"redirect": 1} if self.prefer_redirect else None
        try:
            response = await self._http.send(
                self._http.build_request("GET", path, params=params, timeout=httpx.Timeout(300, connect=10)),
                stream=True,
            )
            try:
                if response.status_code == 307:
                    location = response.headers["location"]
                    await response.aclose()
                    response = await self._plain.send(self._plain.build_request("GET", location), stream=True)
                if response.status_code >= 400:
                    await response.aread()
                    raise _error(response)
                size = int(response.headers.get("content-length", 0)) or None
                with (
                    open(tmp, "wb") as out,
                    transfer_progress(f"fetch {packet_id[:12]}", size, quiet=self.quiet) as advance,
                ):
                    async for chunk in response.aiter_bytes(CHUNK):
                        header = verifier.feed(chunk)
                        if header is not None:
                            key = await self.verify_key_for(header.manifest.key_fingerprint)
                            verify_signature(header, key)
                        await asyncio.to_thread(out.write, chunk)
                        advance(len(chunk))
                    result = verifier.finish()
                    if self.fsync:
                        out.flush()
                        os.fsync(out.fileno())
            finally:
                await response.aclose()
            assert key is not None
            os.replace(tmp, final)
            return FetchedPacket(final, packet_id, result.header.manifest, key.fingerprint, result.size)
        except PacketError as exc:
            raise VerificationError(exc.code, exc.message) from None
        finally:
            verifier.close()
            tmp.unlink(missing_ok=True)

    async def subscribe(
        self,
        topic: str,
        name: str,
        *,
        dest: PathLike | None = None,
        wait: float = 25.0,
        limit: int = 50,
        once: bool = False,
    ) -> AsyncIterator[Delivery]:
        """Async twin of :meth:`BrokerClient.subscribe` (same ordering and acknowledgement rules)."""
        dest_dir = Path(dest) if dest is not None else Path.cwd() / "m2kt-inbox"
        dest_dir.mkdir(parents=True, exist_ok=True)
        await self._send(calls.ensure_subscription(name, topic))
        failures = 0
        while True:
            try:
                page = await self._send(calls.subscription_events(name, 0 if once else wait, limit))
                failures = 0
            except (TransportError, ServiceUnavailable):
                await self._sleep(self.retry.delay(min(failures, 6)))
                failures += 1
                continue
            if not page.items and once:
                return
            for event in page.items:
                path = None
                if event.kind == "published":
                    try:
                        path = (await self.fetch(event.packet.id, dest_dir)).path
                    except M2KTError as exc:
                        if not _skippable(exc):
                            raise
                yield Delivery(event.seq, event.kind, event.packet, path)
                await self._send(calls.ack(name, event.seq))
