"""Admin maintenance: blob garbage collection on demand."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from m2kt.broker.deps import AdminCaller, StateDep
from m2kt.broker.errors import error_responses
from m2kt.broker.gc import collect_garbage
from m2kt.broker.schemas import GcOut

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.post(
    "/gc",
    summary="Remove blobs no committed row points to (older than the grace period)",
    responses=error_responses(401, 403, 503),
)
async def run_gc(
    state: StateDep,
    caller: AdminCaller,
    dry_run: Annotated[bool, Query(description="Only report what would be removed.")] = False,
    grace_seconds: Annotated[
        float | None, Query(ge=0, le=30 * 24 * 3600, description="Default: the broker's M2KT_GC_GRACE_SECONDS.")
    ] = None,
) -> GcOut:
    grace = state.settings.gc_grace_seconds if grace_seconds is None else grace_seconds
    report = await run_in_threadpool(collect_garbage, state.sessions, state.storage, grace, dry_run=dry_run)
    return GcOut(**report.as_dict())
