from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from m2kt.broker.deps import KeysCaller, RegistryCaller, SessionDep, StateDep
from m2kt.broker.errors import error_responses
from m2kt.broker.schemas import KeyOut, KeyRegister, KeyRevoke, KeyRevoked
from m2kt.broker.services import keys as service
from m2kt.broker.services.records import key_out

router = APIRouter(prefix="/v1/keys", tags=["keys"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Register a public key (yours; as admin, name its owner)",
    responses={
        200: {"model": KeyOut, "description": "Already registered"},
        **error_responses(400, 401, 403, 404, 409, 413),
    },
)
def register_key(
    body: KeyRegister, session: SessionDep, state: StateDep, caller: KeysCaller, response: Response
) -> KeyOut:
    key, created = service.register_key(session, caller, body, state.settings)
    if not created:
        response.status_code = status.HTTP_200_OK
    return key_out(key)


@router.get("", summary="The key registry, oldest first, a page at a time", responses=error_responses(401, 403, 404))
def list_keys(
    session: SessionDep,
    caller: RegistryCaller,
    owner: str | None = None,
    after: Annotated[str | None, Query(description="The last fingerprint of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
) -> list[KeyOut]:
    return [key_out(k) for k in service.list_keys(session, owner, after, limit)]


@router.get(
    "/{fingerprint}", summary="One key: what clients verify packets against", responses=error_responses(401, 403, 404)
)
def get_key(fingerprint: str, session: SessionDep, caller: RegistryCaller) -> KeyOut:
    return key_out(service.get_key(session, fingerprint))


@router.post(
    "/{fingerprint}/revoke",
    summary="Revoke a key; its packets become revoked",
    responses=error_responses(401, 403, 404, 413),
)
def revoke_key(fingerprint: str, body: KeyRevoke, session: SessionDep, caller: KeysCaller) -> KeyRevoked:
    key, count = service.revoke_key(session, caller, fingerprint, body.reason)
    return KeyRevoked(key=key_out(key), packets_revoked=count)


@router.delete(
    "/{fingerprint}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Drop a key no packet references (e.g. registered under the wrong node); else revoke it",
    responses=error_responses(401, 403, 404, 409),
)
def delete_key(fingerprint: str, session: SessionDep, caller: KeysCaller) -> None:
    service.delete_key(session, caller, fingerprint)
