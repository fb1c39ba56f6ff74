from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from m2kt.broker.deps import AdminCaller, PublishCaller, ReadCaller, SessionDep, StateDep
from m2kt.broker.errors import Unauthorized, error_responses
from m2kt.broker.routes.slots import LongPollSlot, StreamSlot, UploadSlot
from m2kt.broker.schemas import MAX_BIGINT, EventPage, PacketOut, TopicOut, TopicUpdate
from m2kt.broker.services import audit, topics
from m2kt.broker.services.pages import raw_event_page
from m2kt.broker.services.subscriptions import wait_for_events
from m2kt.broker.services.topics import get_topic, topic_out
from m2kt.broker.services.upload import receive_packet, upload_incomplete

router = APIRouter(prefix="/v1/topics", tags=["topics and packets"])

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "The packet file (.m2kt), streamed as the raw body.",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def _resume_from(last_event_id: str | None) -> int:
    """The cursor an SSE client's Last-Event-ID names; 0 unless it is a seq (ASCII digits, 64-bit).

    ``"²".isdigit()`` is True but ``int("²")`` raises, and so does ``int()`` of over 4,300 digits."""
    value = last_event_id or ""
    if 0 < len(value) <= 19 and value.isascii() and value.isdigit() and int(value) <= MAX_BIGINT:
        return int(value)
    return 0


async def _body(request: Request) -> AsyncIterator[bytes]:
    """The request body as it arrives; a client that goes away mid-upload (400 ``upload_incomplete``), or
    sends no byte for M2KT_BODY_IDLE_TIMEOUT_SECONDS (408 ``upload_stalled``), is a refused upload: the
    error raised here aborts what was staged."""
    from m2kt.broker.stalls import idle_limited, upload_stalled

    idle = request.app.state.broker.settings.body_idle_timeout_seconds
    try:
        async for chunk in idle_limited(request.stream(), idle, upload_stalled):
            yield chunk
    except ClientDisconnect:
        raise upload_incomplete() from None


@router.get("", summary="List topics by name, a page at a time", responses=error_responses(401, 403))
def list_topics(
    session: SessionDep,
    state: StateDep,
    caller: ReadCaller,
    after: Annotated[str | None, Query(description="The last name of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
) -> list[TopicOut]:
    return [topic_out(session, t, state.settings.safety_threshold) for t in topics.list_topics(session, after, limit)]


@router.get("/{topic}", summary="One topic", responses=error_responses(401, 404))
def read_topic(topic: str, session: SessionDep, state: StateDep, caller: ReadCaller) -> TopicOut:
    return topic_out(session, get_topic(session, topic), state.settings.safety_threshold)


@router.patch("/{topic}", summary="Set a topic's safety threshold", responses=error_responses(401, 403, 404, 413))
def update_topic(topic: str, body: TopicUpdate, session: SessionDep, state: StateDep, caller: AdminCaller) -> TopicOut:
    row = get_topic(session, topic)
    row.safety_threshold = body.safety_threshold
    audit.record(session, caller.node_id, "topic.updated", topic, safety_threshold=body.safety_threshold)
    return topic_out(session, row, state.settings.safety_threshold)


@router.post(
    "/{topic}/packets",
    status_code=status.HTTP_201_CREATED,
    summary="Upload a packet (streamed; validated before it is stored)",
    openapi_extra=UPLOAD_BODY,
    responses={
        200: {"model": PacketOut, "description": "The same packet was uploaded before"},
        **error_responses(400, 401, 403, 408, 413, 422, 429, 503),
    },
)
async def upload_packet(
    topic: str,
    request: Request,
    response: Response,
    state: StateDep,
    caller: PublishCaller,
    _slot: UploadSlot,
    content_length: Annotated[int | None, Header(include_in_schema=False)] = None,  # transport, not API
) -> PacketOut:
    record, created = await receive_packet(state, caller, topic, _body(request), content_length)
    if not created:
        response.status_code = status.HTTP_200_OK
    return record


@router.get(
    "/{topic}/packets",
    summary="The topic's events after a cursor; long-polls with ?wait=",
    response_model=EventPage,
    response_class=Response,
    responses=error_responses(401, 403, 404, 429),
)
async def list_packets(
    topic: str,
    state: StateDep,
    caller: ReadCaller,
    _slot: LongPollSlot,
    after: Annotated[int, Query(ge=0, le=MAX_BIGINT, description="Return events with seq > after")] = 0,
    wait: Annotated[float, Query(ge=0, description="Seconds to wait when there is nothing yet")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    if wait <= 0:
        page = await run_in_threadpool(raw_event_page, state.reads, topic, after, limit)
    else:
        page = await wait_for_events(state, caller, topic, after, wait, limit)
    return Response(page.json(), media_type="application/json")  # an EventPage, written without decoding


@router.get(
    "/{topic}/events",
    summary="Server-Sent Events: one `published` / `revoked` / `quarantined` event per log entry",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **error_responses(401, 403, 404, 429)},
)
async def stream_events(
    topic: str,
    request: Request,
    state: StateDep,
    caller: ReadCaller,
    _slot: StreamSlot,
    after: Annotated[int | None, Query(ge=0, le=MAX_BIGINT)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    cursor = after if after is not None else _resume_from(last_event_id)
    await run_in_threadpool(raw_event_page, state.reads, topic, cursor, 1)  # 404 now, not mid-stream

    async def events() -> AsyncIterator[bytes]:
        nonlocal cursor
        yield b": connected\n\n"
        while not await request.is_disconnected():
            try:
                page = await wait_for_events(state, caller, topic, cursor, state.settings.sse_heartbeat_seconds, 100)
            except Unauthorized as exc:  # revoked, expired or disabled since the stream opened: say so, end it
                data = json.dumps({"code": exc.code, "message": exc.message}, separators=(",", ":"))
                yield f"event: error\ndata: {data}\n\n".encode()
                return
            for item in page.items:
                yield f"id: {item.seq}\nevent: {item.kind}\ndata: ".encode() + item.json + b"\n\n"
            if not page.items:
                yield b": keepalive\n\n"
            cursor = page.cursor
            await asyncio.sleep(0)

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
