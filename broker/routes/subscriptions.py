from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from m2kt.broker.deps import CurrentCaller, ReadCaller, SessionDep, StateDep
from m2kt.broker.errors import error_responses
from m2kt.broker.models import Subscription
from m2kt.broker.routes.slots import LongPollSlot
from m2kt.broker.schemas import AckIn, EventPage, SubscriptionCreate, SubscriptionOut
from m2kt.broker.services import subscriptions as service

router = APIRouter(prefix="/v1/subscriptions", tags=["subscriptions"])


@router.put(
    "/{name}",
    status_code=status.HTTP_201_CREATED,
    summary="Create (or get) a named subscription to a topic",
    responses={
        200: {"model": SubscriptionOut, "description": "Exists already"},
        **error_responses(400, 401, 403, 409, 413),
    },
)
def put_subscription(
    name: str, body: SubscriptionCreate, session: SessionDep, state: StateDep, caller: ReadCaller, response: Response
) -> SubscriptionOut:
    sub, created = service.ensure_subscription(session, caller, name, body.topic, state.settings)
    if not created:
        response.status_code = status.HTTP_200_OK
    return service.subscription_out(sub)


@router.get("", summary="Your subscriptions", responses=error_responses(401))
def list_subscriptions(session: SessionDep, caller: CurrentCaller) -> list[SubscriptionOut]:
    rows = session.scalars(select(Subscription).where(Subscription.node_id == caller.node_id).order_by(Subscription.id))
    return [service.subscription_out(s) for s in rows]


@router.get("/{name}", summary="A subscription and its cursor", responses=error_responses(401, 404))
def get_subscription(name: str, session: SessionDep, caller: CurrentCaller) -> SubscriptionOut:
    return service.subscription_out(service.get_subscription(session, caller, name))


@router.get(
    "/{name}/packets",
    summary="Events after the kept cursor (long-polls with ?wait=); does not move it",
    response_model=EventPage,
    response_class=Response,
    responses=error_responses(401, 403, 404, 429),
)
async def next_events(
    name: str,
    state: StateDep,
    caller: ReadCaller,
    _slot: LongPollSlot,
    wait: Annotated[float, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    topic, after = await run_in_threadpool(service.subscription_cursor, state, caller, name)
    page = await service.wait_for_events(state, caller, topic, after, wait, limit)
    return Response(page.json(), media_type="application/json")  # an EventPage, written without decoding


@router.post(
    "/{name}/ack",
    summary="Acknowledge handled events up to a seq (the cursor only moves forward)",
    responses=error_responses(401, 404, 409, 413),
)
def ack(name: str, body: AckIn, state: StateDep, caller: CurrentCaller) -> SubscriptionOut:
    return service.acknowledge_out(state, caller, name, body.cursor)
