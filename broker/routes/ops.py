from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from m2kt.broker.deps import StateDep
from m2kt.broker.errors import database_unavailable, error_responses, storage_unavailable

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: database and storage reachable", responses=error_responses(503))
async def readyz(state: StateDep) -> dict[str, str]:
    def check_db() -> None:
        with state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    try:
        await run_in_threadpool(check_db)
    except Exception as exc:  # noqa: BLE001
        raise database_unavailable(exc) from exc
    try:
        await run_in_threadpool(state.storage.check)
    except Exception as exc:  # noqa: BLE001
        raise storage_unavailable(exc) from exc
    return {"status": "ready", "storage": state.storage.description}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(state: StateDep) -> Response:
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")
