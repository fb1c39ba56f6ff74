"""The per-node concurrency caps (:mod:`m2kt.broker.concurrency`) as FastAPI dependencies, one route
parameter each: ``_slot: UploadSlot`` (the packet upload), ``_slot: StreamSlot`` (the SSE stream),
``_slot: LongPollSlot`` (a page that long-polls with ``?wait=``).

Each comes after the token and scope check it depends on (strangers never reach the counters), and holds
the slot until the response has been sent — for a streamed response, until the stream ends or the client
goes away. Past the cap: 429 ``too_many_uploads`` / ``too_many_streams`` with ``Retry-After``.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request

from m2kt.broker.caller import Caller
from m2kt.broker.concurrency import NodeConcurrency
from m2kt.broker.deps import PublishCaller, ReadCaller

__all__ = ["LongPollSlot", "StreamSlot", "UploadSlot"]


def _limits(request: Request) -> NodeConcurrency:
    return request.app.state.node_concurrency  # type: ignore[no-any-return]


def _waits(request: Request) -> bool:
    """Whether this request long-polls (``?wait=`` above 0); an unparsable value is left to the route's 422."""
    raw = request.query_params.get("wait")
    if raw is None:
        return False
    try:
        wait = float(raw)
    except ValueError:
        return False
    return math.isfinite(wait) and wait > 0


# async: they run on the event loop, not in a worker thread; the slot is held until the response has
# been sent — for a streamed response, until the stream ends or the client goes away.
async def upload_slot(request: Request, caller: PublishCaller) -> AsyncIterator[Caller]:
    with _limits(request).uploads.hold(caller):
        yield caller


async def stream_slot(request: Request, caller: ReadCaller) -> AsyncIterator[Caller]:
    with _limits(request).streams.hold(caller):
        yield caller


async def long_poll_slot(request: Request, caller: ReadCaller) -> AsyncIterator[Caller]:
    if not _waits(request):
        yield caller
        return
    with _limits(request).streams.hold(caller):
        yield caller


#: One of the node's ``M2KT_MAX_UPLOADS_PER_NODE`` upload slots, for the whole upload (after ``PublishCaller``).
UploadSlot = Annotated[Caller, Depends(upload_slot)]
#: One of the node's ``M2KT_MAX_STREAMS_PER_NODE`` stream slots, until the SSE stream ends (after ``ReadCaller``).
StreamSlot = Annotated[Caller, Depends(stream_slot)]
#: A stream slot while a ``?wait=`` long-poll waits; a plain page (no ``wait``) takes none.
LongPollSlot = Annotated[Caller, Depends(long_poll_slot)]
