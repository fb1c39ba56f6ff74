from __future__ import annotations

from fastapi import APIRouter, Response, status
from sqlalchemy import select

from m2kt.broker.deps import CurrentCaller, KeysCaller, SessionDep
from m2kt.broker.errors import error_responses
from m2kt.broker.models import PublicKey
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
def register_key(body: KeyRegister, session: SessionDep, caller: KeysCaller, response: Response) -> KeyOut:
    key, created = service.register_key(session, caller, body.public_key, body.owner)
    if not created:
        response.status_code = status.HTTP_200_OK
    return key_out(key)


@router.get("", summary="The key registry", responses=error_responses(401))
def list_keys(session: SessionDep, caller: CurrentCaller, owner: str | None = None) -> list[KeyOut]:
    rows = session.scalars(select(PublicKey).order_by(PublicKey.created_at))
    return [key_out(k) for k in rows if owner is None or k.owner.name == owner]


@router.get(
    "/{fingerprint}", summary="One key: what clients verify packets against", responses=error_responses(401, 404)
)
def get_key(fingerprint: str, session: SessionDep, caller: CurrentCaller) -> KeyOut:
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
