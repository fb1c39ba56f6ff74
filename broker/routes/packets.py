from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, status
from fastapi.responses import RedirectResponse, StreamingResponse
from sqlalchemy import select
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from m2kt.broker.deps import AdminCaller, ReadCaller, ReceiptCaller, SessionDep, StateDep
from m2kt.broker.errors import NotFound, error_responses
from m2kt.broker.models import IngestionReceipt, PacketStatus
from m2kt.broker.schemas import LineageOut, PacketOut, ReceiptIn, ReceiptOut
from m2kt.broker.services import packets as service
from m2kt.broker.services.records import packet_out
from m2kt.broker.storage import BlobNotFound

router = APIRouter(prefix="/v1/packets", tags=["topics and packets"])


@router.get(
    "/{packet_id}",
    summary="A packet's record: manifest, publisher, key, safety verdict, status",
    responses=error_responses(401, 403, 404),
)
def get_packet(packet_id: str, session: SessionDep, caller: ReadCaller) -> PacketOut:
    packet = service.get_packet(session, packet_id)
    if packet.status is not PacketStatus.accepted and not caller.is_admin and packet.publisher_id != caller.node_id:
        service.check_servable(packet, caller)
    return packet_out(session, packet)


@router.get(
    "/{packet_id}/blob",
    summary="The packet's bytes (Range supported), or ?redirect=1 for a presigned storage URL",
    response_class=StreamingResponse,
    response_model=None,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        206: {"description": "Partial content"},
        307: {"description": "Redirect to a presigned URL; X-M2KT-Size gives the packet's size in bytes"},
        **error_responses(401, 403, 404, 416, 503),
    },
)
async def get_blob(
    packet_id: str,
    state: StateDep,
    caller: ReadCaller,
    redirect: Annotated[bool, Query(description="Answer 307 to a presigned S3 URL when storage offers one")] = False,
    range_: Annotated[str | None, Header(alias="range")] = None,
) -> StreamingResponse | RedirectResponse:

    def lookup() -> tuple[str, int]:
        with state.reads() as session:
            packet = service.get_packet(session, packet_id)
            service.check_servable(packet, caller)
            return packet.storage_key, packet.size

    key, size = await run_in_threadpool(lookup)
    try:
        if redirect:
            url = await run_in_threadpool(state.storage.presigned_get, key, state.settings.presign_ttl_seconds)
            if url is not None:  # the size lets a client split the download into exact ranges
                headers = {"X-M2KT-Size": str(size)}
                return RedirectResponse(url, status_code=status.HTTP_307_TEMPORARY_REDIRECT, headers=headers)
        span = service.parse_range(range_, size)
        start, end = span if span else (0, size)
        chunks = await run_in_threadpool(state.storage.read, key, start, end)
    except BlobNotFound as exc:
        raise NotFound("the packet's blob is missing from storage", code="blob_missing") from exc

    async def body():  # type: ignore[no-untyped-def]
        async for chunk in iterate_in_threadpool(chunks):
            state.metrics.bytes_out.inc(len(chunk))
            yield chunk

    headers = {
        "Accept-Ranges": "bytes",
        "Content-Length": str(end - start),
        "ETag": f'"{packet_id}"',
        "Content-Disposition": f'attachment; filename="{packet_id}.m2kt"',
    }
    if span:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    return StreamingResponse(
        body(), status_code=206 if span else 200, media_type="application/octet-stream", headers=headers
    )


@router.get("/{packet_id}/lineage", summary="Ancestors and descendants", responses=error_responses(401, 404))
def get_lineage(packet_id: str, session: SessionDep, caller: ReadCaller) -> LineageOut:
    return service.lineage(session, packet_id)


@router.post(
    "/{packet_id}/receipts",
    status_code=status.HTTP_201_CREATED,
    summary="Report an ingestion (accepted / rolled back) with its scores; the ingesting node's token, not an admin's",
    responses=error_responses(401, 403, 404, 409, 413),
)
def post_receipt(
    packet_id: str, body: ReceiptIn, session: SessionDep, state: StateDep, caller: ReceiptCaller
) -> ReceiptOut:
    settings = state.settings
    return service.add_receipt(
        session,
        caller,
        packet_id,
        body,
        max_bytes=settings.max_receipt_bytes,
        max_count=settings.max_receipts_per_packet,
    )


@router.get("/{packet_id}/receipts", summary="Ingestion receipts for a packet", responses=error_responses(401, 404))
def list_receipts(packet_id: str, session: SessionDep, caller: ReadCaller) -> list[ReceiptOut]:
    service.get_packet(session, packet_id)
    rows = session.scalars(
        select(IngestionReceipt).where(IngestionReceipt.packet_id == packet_id).order_by(IngestionReceipt.id)
    )
    return [service.receipt_out(r) for r in rows]


@router.post(
    "/{packet_id}/quarantine",
    summary="Withdraw a packet pending review (admin)",
    responses=error_responses(401, 403, 404, 409),
)
def quarantine(packet_id: str, session: SessionDep, caller: AdminCaller) -> PacketOut:
    return packet_out(session, service.set_status(session, caller, packet_id, PacketStatus.quarantined))


@router.post(
    "/{packet_id}/release",
    summary="Release a quarantined packet (admin)",
    responses=error_responses(401, 403, 404, 409),
)
def release(packet_id: str, session: SessionDep, caller: AdminCaller) -> PacketOut:
    return packet_out(session, service.set_status(session, caller, packet_id, PacketStatus.accepted))
