"""BrokerClient: publish, fetch and subscribe — never handing back an unverified packet.

Idempotent calls (reads, PUTs, content-addressed uploads, monotonic acknowledgements) are retried on
connection errors, 429 and 5xx with exponential backoff and jitter, honouring ``Retry-After``; others
are sent once. The calls themselves are described once, in :mod:`m2kt.sdk.calls`; the asyncio twin is
:class:`m2kt.sdk.async_client.AsyncBrokerClient`. Errors are the tree in :mod:`m2kt.errors`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
from m2kt.sdk.ranged import PART, WORKERS, parse_content_range, parts_in_order
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


class BrokerClient(ClientBase):
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
        download_workers: int = WORKERS,
    ) -> None:
        """``download_workers``: ranged requests in flight while fetching a packet larger than one part
        (8 MiB); 1 (the default) downloads in a single stream — see :mod:`m2kt.sdk.ranged` for when more help."""
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
        if download_workers < 1:
            raise ValueError("download_workers must be at least 1")
        self.download_workers = download_workers
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
            self._sleep(wait)
            attempt += 1

    # -- resources

    def me(self) -> WhoAmI:
        return self._send(calls.me())

    def topics(self) -> list[TopicRecord]:
        """Every topic, by name (page after page)."""
        out: list[TopicRecord] = []
        while len(page := self._send(calls.topics(out[-1].name if out else None))) == calls.PAGE:
            out += page
        return out + page

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

    def keys(self, owner: str | None = None) -> list[KeyRecord]:
        """The key registry, oldest first; ``owner``: only that node's keys."""
        out: list[KeyRecord] = []
        while len(page := self._send(calls.keys(owner, out[-1].fingerprint if out else None))) == calls.PAGE:
            out += page
        return out + page

    def key(self, fingerprint: str) -> KeyRecord:
        return self._send(calls.key(fingerprint))

    def register_key(self, key: SigningKey | KeyProof | PathLike, owner: str | None = None) -> KeyRecord:
        """Register a key, proving this node holds it: ``key`` is the private key (a ``SigningKey`` or its
        ``NAME.key`` file; it signs the registration here and only the signature is sent), or, as admin
        with ``owner``, the ``KeyProof`` that node made (``m2kt key prove``)."""
        proof = calls.key_proof(key, lambda: owner or self.me().node)
        return self._send(calls.register_key(proof, owner))

    def revoke_key(self, fingerprint: str, reason: str | None = None) -> KeyRevocation:
        return self._send(calls.revoke_key(fingerprint, reason))

    def delete_key(self, fingerprint: str) -> None:
        """Drop a key no packet references (owner or admin), e.g. one registered under the wrong node;
        a key that signed packets is refused (409 ``key_in_use``): revoke it instead."""
        self._send(calls.delete_key(fingerprint))

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
        path = packet_path(packet)
        size = path.stat().st_size

        def body() -> Iterator[bytes]:
            with open(path, "rb") as f, transfer_progress(f"publish {path.name}", size, quiet=self.quiet) as advance:
                while chunk := f.read(CHUNK):
                    advance(len(chunk))
                    yield chunk

        call, headers = calls.publish(topic, size)
        return self._send(call, content_factory=body, headers=headers)

    def verify_key_for(self, fingerprint: str, *, fresh: bool = False) -> VerifyKey:
        """The registered, unrevoked (and, if pinned, trusted) key with this fingerprint; ``fresh`` asks
        the broker again instead of trusting this client's cache (a revoked key leaves the cache)."""
        if fresh or fingerprint not in self._keys:
            self._keys.pop(fingerprint, None)
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
            with self._open_blob(packet_id) as (response, fetch_range), open(tmp, "wb") as out:
                span = parse_content_range(response.headers.get("content-range"))
                size = span[2] if span else int(response.headers.get("content-length", 0)) or None
                with transfer_progress(f"fetch {packet_id[:12]}", size, quiet=self.quiet) as advance:
                    for chunk in self._blob_chunks(response, span, fetch_range):
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
            # The cached key checked the signature; before the packet is handed over, the registry is
            # asked again, so a key revoked since it was cached (or during the download) is refused.
            self.verify_key_for(key.fingerprint, fresh=True)
            os.replace(tmp, final)
            return FetchedPacket(final, packet_id, result.header.manifest, key.fingerprint, result.size)
        finally:
            verifier.close()
            tmp.unlink(missing_ok=True)

    def _blob_chunks(
        self, response: httpx.Response, span: tuple[int, int, int] | None, fetch_range: Callable[[int, int], bytes]
    ) -> Iterator[bytes]:
        """The first response's bytes, then — when it was the first part of a larger object — the rest,
        fetched in ranged requests from several threads and handed over in order."""
        yield from response.iter_bytes(CHUNK)
        if span is not None and span[0] == 0 and span[1] < span[2]:
            for part in parts_in_order(fetch_range, span[1], span[2], part=PART, workers=self.download_workers):
                for at in range(0, len(part), CHUNK):
                    yield part[at : at + CHUNK]

    def _open_blob(self, packet_id: str) -> Any:
        """A context manager giving (the response to the first GET, a :class:`_RangeSource` for any other range
        of the same object). The first request asks for the first PART bytes only when the client downloads
        in parallel; a server that ignores ranges answers the whole object (200)."""

        @contextmanager
        def opened() -> Iterator[tuple[httpx.Response, _RangeSource]]:
            source = _RangeSource(self, packet_id)
            first = {"Range": f"bytes=0-{PART - 1}"} if self.download_workers > 1 else {}
            response = self._http.send(
                self._http.build_request(
                    "GET", source.path, params=source.params, headers=first, timeout=source.timeout
                ),
                stream=True,
            )
            try:
                if response.status_code == 307:
                    source.url, source.redirected = response.headers["location"], True
                    size = int(response.headers.get("x-m2kt-size", "0") or 0)
                    response.close()
                    # Storage servers differ on a range past the end (AWS clamps, others answer 400): ask for
                    # a first part only when the broker said the object is larger than one.
                    ranged = first if size > PART else {}
                    request = self._plain.build_request("GET", source.url, headers=ranged, timeout=source.timeout)
                    response = self._plain.send(request, stream=True)
                if response.status_code >= 400:
                    response.read()
                    raise error_of(response)
                yield response, source
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
                        if not skippable(exc):
                            raise
                yield Delivery(event.seq, event.kind, event.packet, path)
                self._send(calls.ack(name, event.seq))


class _RangeSource:
    """Where the ranges of one packet's bytes come from: the broker's blob route, or the presigned URL it
    redirected to — renewed from the broker when it expires mid-download (they live a minute by default).
    Called from several threads at once (:func:`m2kt.sdk.ranged.parts_in_order`)."""

    def __init__(self, client: BrokerClient, packet_id: str) -> None:
        self.client, self.packet_id = client, packet_id
        self.path = f"/v1/packets/{calls._q(packet_id)}/blob"
        self.params = {"redirect": 1} if client.prefer_redirect else None
        self.timeout = httpx.Timeout(300, connect=10)
        self.url, self.redirected = self.path, False
        self._renewing = threading.Lock()

    def _renew(self, expired: str) -> None:
        with self._renewing:
            if self.url != expired:  # another thread renewed it already
                return
            again = self.client._http.get(self.path, params=self.params, timeout=self.timeout)
            if again.status_code != 307:
                raise error_of(again)
            self.url = str(again.headers["location"])

    def __call__(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the packet, exactly, or an error."""
        headers = {"Range": f"bytes={start}-{end - 1}"}
        if not self.redirected:
            part = self.client._http.get(self.path, params=self.params, headers=headers, timeout=self.timeout)
        else:
            url = self.url
            part = self.client._plain.get(url, headers=headers, timeout=self.timeout)
            if part.status_code in (400, 403):  # the presigned URL expired: ask the broker again
                self._renew(url)
                part = self.client._plain.get(self.url, headers=headers, timeout=self.timeout)
        if part.status_code >= 400:
            raise error_of(part)
        if part.status_code != 206 or len(part.content) != end - start:
            raise TransportError(
                f"download {self.packet_id[:16]}…: asked for bytes {start}-{end - 1}, got status "
                f"{part.status_code} with {len(part.content)} bytes"
            )
        return part.content
