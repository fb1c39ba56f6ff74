from __future__ import annotations

import logging

from fastapi import APIRouter, Response
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from m2kt.broker.deps import StateDep
from m2kt.broker.errors import DependencyDown, error_responses

router = APIRouter(tags=["operations"])
log = logging.getLogger("m2kt.broker")


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: database and storage reachable", responses=error_responses(503))
async def readyz(state: StateDep) -> dict[str, str]:
    """Unauthenticated, so it says whether, never where: no path, bucket, endpoint or driver message
    (those go to the broker's log; an admin sees the storage in ``GET /v1/admin/stats``)."""

    def check_db() -> None:
        with state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    for part, check in (("database", check_db), ("storage", state.storage.check)):
        try:
            await run_in_threadpool(check)
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            log.warning("readyz: %s is unavailable: %s", part, exc)
            raise DependencyDown(
                f"the {part} is unavailable; the broker's log says why", code=f"{part}_unavailable"
            ) from exc
    return {"status": "ready"}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(state: StateDep) -> Response:
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")
