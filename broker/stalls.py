"""Request bodies that stop arriving: the idle deadline (``M2KT_BODY_IDLE_TIMEOUT_SECONDS``) and its 408.

A packet upload from which no body bytes arrive for that long is refused, 408 ``upload_stalled``, and
its staged data is discarded (as for a client that disconnects). Any other route's body — small, at
most ``M2KT_MAX_JSON_BODY_BYTES``, read whole by the request guard — must be complete that long after
the request head: 408 ``body_stalled``. Either response says ``Connection: close``: the rest of the
body is never read. (A response the client stops reading is the server's business:
:mod:`m2kt.broker.server`.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from m2kt.broker.errors import BrokerError

__all__ = ["RequestTimeout", "body_stalled", "idle_limited", "upload_stalled", "within"]

T = TypeVar("T")

#: Headers of every stall refusal.
CLOSE = {"Connection": "close"}


class RequestTimeout(BrokerError):
    status, code = 408, "request_timeout"


def _seconds(seconds: float) -> str:
    return f"{seconds:g} s"


def upload_stalled(seconds: float) -> RequestTimeout:
    """The refusal of an upload whose body stopped arriving."""
    return RequestTimeout(
        f"no bytes of the upload arrived for {_seconds(seconds)} (M2KT_BODY_IDLE_TIMEOUT_SECONDS); "
        "it was discarded — send the packet again",
        code="upload_stalled",
        headers=dict(CLOSE),
    )


def body_stalled(seconds: float) -> RequestTimeout:
    """The refusal of a (small, non-upload) request body not complete in time."""
    return RequestTimeout(
        f"the request body was not complete {_seconds(seconds)} after the request head "
        "(M2KT_BODY_IDLE_TIMEOUT_SECONDS)",
        code="body_stalled",
        headers=dict(CLOSE),
    )


async def within(awaitable: Awaitable[T], seconds: float) -> T:
    """``await awaitable``, or ``TimeoutError`` after ``seconds`` (the awaitable is cancelled)."""
    async with asyncio.timeout(seconds):
        return await awaitable


async def idle_limited(
    chunks: AsyncIterator[bytes], seconds: float, refusal: Callable[[float], BrokerError] = upload_stalled
) -> AsyncIterator[bytes]:
    """``chunks``, as they arrive; raises ``refusal(seconds)`` when none arrives for ``seconds``.

    Only the wait for the next chunk is timed, never the consumer's work between chunks."""
    iterator = aiter(chunks)
    while True:
        try:
            chunk = await within(anext(iterator), seconds)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise refusal(seconds) from None
        yield chunk
