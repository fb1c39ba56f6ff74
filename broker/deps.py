"""Named dependencies, so a route's signature reads like a sentence:
``def get_packet(packet_id: str, session: SessionDep, caller: ReadCaller) -> PacketOut``.

Every scope check is here, in a dependency, so it runs before a request body is read or validated.
This is the one broker module besides the routes and the app that knows FastAPI.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from m2kt.broker.caller import Caller
from m2kt.broker.security import allows
from m2kt.broker.services.auth import authenticate
from m2kt.broker.services.topics import check_topic_name
from m2kt.broker.state import BrokerState

__all__ = [
    "AdminCaller",
    "CurrentCaller",
    "KeysCaller",
    "PublishCaller",
    "ReadCaller",
    "ReceiptCaller",
    "RegistryCaller",
    "SessionDep",
    "StateDep",
    "get_state",
]


# The dependencies that only read what is at hand are ``async``: FastAPI runs a plain ``def`` dependency in a
# worker thread, and under load a hop to the thread pool and back costs more than what they do.
async def get_state(request: Request) -> BrokerState:
    return request.app.state.broker  # type: ignore[no-any-return]


StateDep = Annotated[BrokerState, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    """One request, one transaction: commit on success, roll back on error (a database failure is
    rendered by the app's handler as 503 ``database_unavailable``)."""
    session = state.sessions()
    try:
        yield session
        session.commit()
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


def current_caller(
    state: StateDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
) -> Caller:
    return authenticate(state.reads, credentials.credentials if credentials else None)


CurrentCaller = Annotated[Caller, Depends(current_caller)]


def _scoped(needed: str) -> Callable[[Caller], Caller]:
    """A dependency that refuses callers without ``needed`` — before the request body is validated."""

    async def dependency(caller: CurrentCaller) -> Caller:
        caller.require(needed)
        return caller

    dependency.__name__ = f"{needed}_caller"
    return dependency


async def registry_caller(caller: CurrentCaller) -> Caller:
    """The key registry is for nodes that verify packets or manage keys: 'read' or 'keys' (not 'receipt' alone)."""
    if not (allows(caller.scopes, "read") or allows(caller.scopes, "keys")):
        caller.require("read")
    return caller


async def publish_caller(topic: str, caller: CurrentCaller) -> Caller:
    """The ``{topic}`` path parameter is a valid topic name the token may publish to."""
    check_topic_name(topic)
    caller.require("publish", topic)
    return caller


AdminCaller = Annotated[Caller, Depends(_scoped("admin"))]
ReadCaller = Annotated[Caller, Depends(_scoped("read"))]
KeysCaller = Annotated[Caller, Depends(_scoped("keys"))]
ReceiptCaller = Annotated[Caller, Depends(_scoped("receipt"))]
PublishCaller = Annotated[Caller, Depends(publish_caller)]
RegistryCaller = Annotated[Caller, Depends(registry_caller)]
