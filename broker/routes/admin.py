from __future__ import annotations

import os
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Response, status
from sqlalchemy import func, select

from m2kt.broker.deps import AdminCaller, SessionDep, StateDep
from m2kt.broker.errors import Malformed, NotFound, error_responses
from m2kt.broker.models import (
    AuditEvent,
    FlaggedConceptSet,
    IngestionReceipt,
    Node,
    Packet,
    PublicKey,
    Subscription,
    Topic,
)
from m2kt.broker.schemas import MAX_BIGINT, AuditOut, FlaggedSetIn, FlaggedSetOut, StatsOut, storable_name
from m2kt.broker.services import audit
from m2kt.broker.services.upsert import insert_or_find

router = APIRouter(prefix="/v1/admin", tags=["admin"])


def _set_out(row: FlaggedConceptSet) -> FlaggedSetOut:
    return FlaggedSetOut(
        name=row.name, d_model=row.d_model, labels=row.labels, threshold=row.threshold, created_at=row.created_at
    )


def _find_flagged(session: SessionDep, name: str) -> FlaggedConceptSet | None:
    return session.scalar(select(FlaggedConceptSet).where(FlaggedConceptSet.name == name))


@router.put(
    "/flagged-concepts/{name}",
    status_code=status.HTTP_201_CREATED,
    summary="Register (or replace) a set of flagged concept directions",
    responses={200: {"model": FlaggedSetOut, "description": "Replaced"}, **error_responses(400, 401, 403, 413)},
)
def put_flagged(
    name: str, body: FlaggedSetIn, session: SessionDep, caller: AdminCaller, response: Response
) -> FlaggedSetOut:
    if not storable_name(name):
        raise Malformed(f"invalid flagged set name {name[:100]!r}: 1-100 characters, no NUL", code="invalid_name")
    if len(body.directions) != len(body.labels) or any(len(row) != body.d_model for row in body.directions):
        raise Malformed(
            f"directions must be {len(body.labels)} rows (one per label) of d_model={body.d_model} numbers",
            code="invalid_flagged_set",
        )
    directions = np.asarray(body.directions, dtype=np.float64)  # rectangular: checked above
    with np.errstate(over="ignore"):
        norms = np.linalg.norm(directions, axis=1)
    if not np.isfinite(norms).all() or (norms == 0).any():  # non-finite entries give a non-finite norm
        raise Malformed("directions must be finite and non-zero, with a finite length", code="invalid_flagged_set")
    row, created = insert_or_find(
        session,
        lambda: _find_flagged(session, name),
        lambda: FlaggedConceptSet(
            name=name, d_model=body.d_model, labels=body.labels, directions=body.directions, threshold=body.threshold
        ),
    )
    if not created:
        response.status_code = status.HTTP_200_OK
    row.d_model, row.labels, row.directions, row.threshold = body.d_model, body.labels, body.directions, body.threshold
    audit.record(session, caller.node_id, "flagged_concepts.set", name, labels=body.labels, threshold=body.threshold)
    session.flush()
    session.refresh(row)
    return _set_out(row)


@router.get("/flagged-concepts", summary="List flagged concept sets", responses=error_responses(401, 403))
def list_flagged(session: SessionDep, caller: AdminCaller) -> list[FlaggedSetOut]:
    return [_set_out(r) for r in session.scalars(select(FlaggedConceptSet).order_by(FlaggedConceptSet.name))]


@router.delete(
    "/flagged-concepts/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Remove a flagged set",
    responses=error_responses(401, 403, 404),
)
def delete_flagged(name: str, session: SessionDep, caller: AdminCaller) -> None:
    row = _find_flagged(session, name) if storable_name(name) else None
    if row is None:
        raise NotFound(f"no flagged set {name[:100]!r}", code="flagged_set_not_found")
    session.delete(row)
    audit.record(session, caller.node_id, "flagged_concepts.deleted", name)


def _count_by(session: SessionDep, column) -> dict[str, int]:  # type: ignore[no-untyped-def]
    return {str(getattr(k, "value", k)): v for k, v in session.execute(select(column, func.count()).group_by(column))}


@router.get("/stats", summary="Counts and bytes", responses=error_responses(401, 403))
def stats(session: SessionDep, state: StateDep, caller: AdminCaller) -> StatsOut:
    keys = session.execute(select(func.count(), func.count(PublicKey.revoked_at))).one()
    return StatsOut(
        packets=_count_by(session, Packet.status),
        bytes_stored=session.scalar(select(func.coalesce(func.sum(Packet.size), 0))) or 0,
        topics=session.scalar(select(func.count()).select_from(Topic)) or 0,
        nodes=_count_by(session, Node.role),
        keys={"total": keys[0], "revoked": keys[1]},
        receipts=_count_by(session, IngestionReceipt.decision),
        subscriptions=session.scalar(select(func.count()).select_from(Subscription)) or 0,
        storage=state.storage.description,
        process=os.getpid(),
    )


@router.get("/audit", summary="The audit log, newest first", responses=error_responses(401, 403))
def audit_log(
    session: SessionDep,
    caller: AdminCaller,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[int | None, Query(ge=0, le=MAX_BIGINT, description="Only entries with id < before")] = None,
) -> list[AuditOut]:
    query = select(AuditEvent, Node.name).outerjoin(Node, Node.id == AuditEvent.actor_id)
    if before is not None:
        query = query.where(AuditEvent.id < before)
    rows = session.execute(query.order_by(AuditEvent.id.desc()).limit(limit))
    return [
        AuditOut(id=e.id, at=e.at, actor=name, action=e.action, target=e.target, detail=e.detail) for e, name in rows
    ]
