"""Drive BrokerClient and AsyncBrokerClient through one synchronous face, so every client test
runs against both (the async one on a private event loop in a thread)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import httpx

from m2kt import AsyncBrokerClient, BrokerClient


class AsyncFacade:
    def __init__(self, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        transport = kwargs.pop("transport", None)
        if isinstance(transport, httpx.BaseTransport) and not isinstance(transport, httpx.AsyncBaseTransport):
            raise TypeError("pass an async transport to the async client")
        self.client = self._run(self._make(transport, kwargs))

    async def _make(self, transport: Any, kwargs: dict[str, Any]) -> AsyncBrokerClient:
        return AsyncBrokerClient(transport=transport, **kwargs)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=300)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if name == "subscribe":
            return self._subscribe
        if callable(attr):
            return lambda *a, **k: self._run(attr(*a, **k))
        return attr

    def _subscribe(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        agen = self.client.subscribe(*args, **kwargs)
        try:
            while True:
                try:
                    yield self._run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(agen.aclose())

    def close(self) -> None:
        self._run(self.client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def make_client(kind: str, **kwargs: Any) -> Any:
    return BrokerClient(**kwargs) if kind == "sync" else AsyncFacade(**kwargs)
