"""The append-only audit log of admin and security events."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from m2kt.broker.models import AuditEvent


def record(session: Session, actor_id: int | None, action: str, target: str | None = None, **detail: Any) -> None:
    session.add(AuditEvent(actor_id=actor_id, action=action, target=target, detail=detail))


def record_separately(
    sessions: Any, actor_id: int | None, action: str, target: str | None = None, **detail: Any
) -> None:
    """Record in its own transaction (for refusals, whose request transaction rolls back)."""
    try:
        with sessions.begin() as session:
            record(session, actor_id, action, target, **detail)
    except Exception:  # noqa: BLE001 - the audit write must not mask the refusal being reported
        pass
