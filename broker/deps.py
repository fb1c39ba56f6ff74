"""Named dependencies, so a route's signature reads like a sentence:
``def get_packet(packet_id: str, session: SessionDep, caller: CurrentCaller) -> PacketOut``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from broker.errors import DependencyDown, Forbidden, Unauthorized
from broker.metrics import Metrics
from broker.models import ApiToken, Role
from broker.pubsub import Hub
from broker.ratelimit import UploadRateLimiter
from broker.security import allows, hash_token
from broker.settings import Settings
from broker.storage import BlobStore


@dataclass
class BrokerState:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    storage: BlobStore
    hub: Hub
    metrics: Metrics
    uploads: UploadRateLimiter


def get_state(request: Request) -> BrokerState:
    return request.app.state.broker  # type: ignore[no-any-return]


StateDep = Annotated[BrokerState, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    """One request, one transaction: commit on success, roll back on error."""
    session = state.sessions()
    try:
        yield session
        session.commit()
    except OperationalError as exc:
        session.rollback()
        raise DependencyDown(f"the database is unavailable: {exc.orig or exc}") from exc
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# scope="function": commit before the response is sent, so a client never reads state older than
# its own acknowledged write, and a failed commit is reported to it instead of after a 200.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="token",
    description="A node's API token (`m2kt_…`), issued by an admin with `POST /v1/nodes`.",
)


@dataclass(frozen=True)
class Caller:
    node_id: int
    node: str
    role: Role
    scopes: tuple[str, ...]
    token_id: int
    token_expires_at: datetime | None

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    def require(self, needed: str, topic: str | None = None) -> None:
        if not allows(self.scopes, needed, topic):
            what = f"publish to topic {topic!r}" if needed == "publish" else f"the '{needed}' scope"
            raise Forbidden(f"this token does not grant {what}", code="insufficient_scope")


def missing_token() -> Unauthorized:
    """The refusal of a request without a bearer token (here and in the request guard)."""
    return Unauthorized(
        "send an API token: Authorization: Bearer m2kt_…", code="missing_token", headers={"WWW-Authenticate": "Bearer"}
    )


def authenticate(state: BrokerState, token: str | None) -> Caller:
    """Resolve a bearer token to its node; refuses unknown, expired, revoked or disabled."""
    if not token:
        raise missing_token()
    now = datetime.now(UTC)
    try:
        with state.sessions.begin() as session:
            row = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token)))
            if row is None:
                raise Unauthorized("unknown API token", code="invalid_token", headers={"WWW-Authenticate": "Bearer"})
            if row.revoked_at is not None:
                raise Unauthorized(
                    "this API token was revoked", code="token_revoked", headers={"WWW-Authenticate": "Bearer"}
                )
            if row.expires_at is not None and row.expires_at <= now:
                raise Unauthorized(
                    "this API token has expired; ask an admin to rotate it",
                    code="token_expired",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            if row.node.disabled_at is not None:
                raise Unauthorized(
                    "this node is disabled", code="node_disabled", headers={"WWW-Authenticate": "Bearer"}
                )
            if row.last_used_at is None or now - row.last_used_at > timedelta(minutes=1):
                row.last_used_at = now
            return Caller(row.node_id, row.node.name, row.node.role, tuple(row.scopes), row.id, row.expires_at)
    except OperationalError as exc:
        raise DependencyDown(f"the database is unavailable: {exc.orig or exc}") from exc


def current_caller(
    state: StateDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
) -> Caller:
    return authenticate(state, credentials.credentials if credentials else None)


CurrentCaller = Annotated[Caller, Depends(current_caller)]


def admin_caller(caller: CurrentCaller) -> Caller:
    caller.require("admin")
    return caller


AdminCaller = Annotated[Caller, Depends(admin_caller)]


def _scoped(needed: str) -> Callable[[Caller], Caller]:
    """A dependency that refuses callers without ``needed`` — before the request body is validated."""

    def dependency(caller: CurrentCaller) -> Caller:
        caller.require(needed)
        return caller

    dependency.__name__ = f"{needed}_caller"
    return dependency


ReadCaller = Annotated[Caller, Depends(_scoped("read"))]
KeysCaller = Annotated[Caller, Depends(_scoped("keys"))]
ReceiptCaller = Annotated[Caller, Depends(_scoped("receipt"))]
