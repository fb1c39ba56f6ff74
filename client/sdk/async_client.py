"""AsyncBrokerClient: the asyncio twin of :class:`m2kt.sdk.client.BrokerClient` (same calls, same rules)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from m2kt.errors import M2KTError, ServiceUnavailable, TransportError
from m2kt.format.key_proof import KeyProof
from m2kt.format.keys import SigningKey, VerifyKey
from m2kt.format.signature import verify_signature
from m2kt.format.stream import StreamVerifier
from m2kt.sdk import calls
from m2kt.sdk._base import CHUNK, ClientBase, PathLike, error_of, packet_path, skippable
from m2kt.sdk.calls import Call, destination, temporary_path, verify_key_from_record
from m2kt.sdk.progress import transfer_progress
from m2kt.sdk.records import (
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
from m2kt.sdk.retry import RetryPolicy

T = TypeVar("T")


class AsyncBrokerClient(ClientBase):
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
                    raise error_of(response)
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
        out: list[TopicRecord] = []
        while len(page := await self._send(calls.topics(out[-1].name if out else None))) == calls.PAGE:
            out += page
        return out + page

    async def events(self, topic: str, *, after: int = 0, wait: float = 0, limit: int = 100) -> EventPage:
        return await self._send(calls.events(topic, after, wait, limit))

    async def packet(self, packet_id: str) -> PacketRecord:
        return await self._send(calls.packet(packet_id))

    async def lineage(self, packet_id: str) -> Lineage:
        return await self._send(calls.lineage(packet_id))

    async def receipts(self, packet_id: str) -> list[Receipt]:
        return await self._send(calls.receipts(packet_id))

    async def keys(self, owner: str | None = None) -> list[KeyRecord]:
        out: list[KeyRecord] = []
        while len(page := await self._send(calls.keys(owner, out[-1].fingerprint if out else None))) == calls.PAGE:
            out += page
        return out + page

    async def key(self, fingerprint: str) -> KeyRecord:
        return await self._send(calls.key(fingerprint))

    async def register_key(self, key: SigningKey | KeyProof | PathLike, owner: str | None = None) -> KeyRecord:
        """As :meth:`BrokerClient.register_key`."""
        node = owner if owner is not None or isinstance(key, KeyProof) else (await self.me()).node
        proof = calls.key_proof(key, lambda: node or "")
        return await self._send(calls.register_key(proof, owner))

    async def revoke_key(self, fingerprint: str, reason: str | None = None) -> KeyRevocation:
        return await self._send(calls.revoke_key(fingerprint, reason))

    async def delete_key(self, fingerprint: str) -> None:
        await self._send(calls.delete_key(fingerprint))

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
        path = packet_path(packet)
        size = path.stat().st_size

        async def body() -> AsyncIterator[bytes]:
            with open(path, "rb") as f, transfer_progress(f"publish {path.name}", size, quiet=self.quiet) as advance:
                while chunk := await asyncio.to_thread(f.read, CHUNK):
                    advance(len(chunk))
                    yield chunk

        call, headers = calls.publish(topic, size)
        return await self._send(call, content_factory=body, headers=headers)

    async def verify_key_for(self, fingerprint: str, *, fresh: bool = False) -> VerifyKey:
        """As :meth:`BrokerClient.verify_key_for`."""
        if fresh or fingerprint not in self._keys:
            self._keys.pop(fingerprint, None)
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
                    raise error_of(response)
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
            await self.verify_key_for(key.fingerprint, fresh=True)  # a key revoked since it was cached: refused
            os.replace(tmp, final)
            return FetchedPacket(final, packet_id, result.header.manifest, key.fingerprint, result.size)
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
                        if not skippable(exc):
                            raise
                yield Delivery(event.seq, event.kind, event.packet, path)
                await self._send(calls.ack(name, event.seq))
