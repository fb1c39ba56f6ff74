from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, status
from sqlalchemy import select

from m2kt.broker.deps import AdminCaller, CurrentCaller, SessionDep, StateDep
from m2kt.broker.errors import error_responses
from m2kt.broker.models import ApiToken, Node
from m2kt.broker.schemas import (
    MAX_BIGINT,
    NodeCreate,
    NodeOut,
    NodeWithToken,
    TokenCreate,
    TokenOut,
    TokenRotate,
    WhoAmI,
)
from m2kt.broker.services import audit
from m2kt.broker.services import nodes as service

router = APIRouter(prefix="/v1", tags=["nodes and tokens"])


@router.post(
    "/nodes",
    status_code=status.HTTP_201_CREATED,
    summary="Register a node and issue its first token",
    responses=error_responses(400, 401, 403, 409, 413),
)
def create_node(body: NodeCreate, session: SessionDep, state: StateDep, caller: AdminCaller) -> NodeWithToken:
    ttl = body.token_ttl_days or state.settings.token_ttl_days
    node, token = service.create_node(session, caller, body.name, body.role, body.scopes, ttl)
    return NodeWithToken(node=NodeOut.model_validate(node), token=token)


@router.get("/nodes", summary="List nodes", responses=error_responses(401, 403))
def list_nodes(session: SessionDep, caller: AdminCaller) -> list[NodeOut]:
    return [NodeOut.model_validate(n) for n in session.scalars(select(Node).order_by(Node.id))]


@router.post(
    "/nodes/{name}/disable",
    summary="Disable a node: every token of it is refused (401 node_disabled) until it is enabled",
    responses=error_responses(401, 403, 404, 409),
)
def disable_node(name: str, session: SessionDep, caller: AdminCaller) -> NodeOut:
    return NodeOut.model_validate(service.set_disabled(session, caller, name, disabled=True))


@router.post("/nodes/{name}/enable", summary="Enable a disabled node", responses=error_responses(401, 403, 404))
def enable_node(name: str, session: SessionDep, caller: AdminCaller) -> NodeOut:
    return NodeOut.model_validate(service.set_disabled(session, caller, name, disabled=False))


@router.get("/me", summary="Who this token belongs to", responses=error_responses(401))
def whoami(caller: CurrentCaller) -> WhoAmI:
    return WhoAmI(
        node=caller.node, role=caller.role, scopes=list(caller.scopes), token_expires_at=caller.token_expires_at
    )


@router.post(
    "/me/token",
    status_code=status.HTTP_201_CREATED,
    summary="Rotate your own token: a new secret with the same scopes; the one used here is revoked",
    responses=error_responses(400, 401, 413),
)
def rotate_own_token(body: TokenRotate, session: SessionDep, state: StateDep, caller: CurrentCaller) -> TokenOut:
    return service.rotate_token(session, caller, body.ttl_days, state.settings.token_ttl_days)


@router.post(
    "/nodes/{name}/tokens",
    status_code=status.HTTP_201_CREATED,
    summary="Issue another token (rotation)",
    responses=error_responses(400, 401, 403, 404, 413),
)
def issue_token(name: str, body: TokenCreate, session: SessionDep, state: StateDep, caller: AdminCaller) -> TokenOut:
    ttl = body.ttl_days or state.settings.token_ttl_days
    token = service.issue_token(session, service.get_node(session, name), body.scopes, ttl)
    audit.record(session, caller.node_id, "token.issued", name, token_id=token.id)
    return token


@router.get(
    "/nodes/{name}/tokens", summary="List a node's tokens (never the secrets)", responses=error_responses(401, 403, 404)
)
def list_tokens(name: str, session: SessionDep, caller: AdminCaller) -> list[TokenOut]:
    node = service.get_node(session, name)
    rows = session.scalars(select(ApiToken).where(ApiToken.node_id == node.id).order_by(ApiToken.id))
    return [service.token_out(r) for r in rows]


@router.delete("/tokens/{token_id}", summary="Revoke a token", responses=error_responses(401, 403, 404))
def revoke_token(
    token_id: Annotated[int, Path(ge=1, le=MAX_BIGINT)], session: SessionDep, caller: AdminCaller
) -> TokenOut:
    return service.token_out(service.revoke_token(session, caller, token_id))
