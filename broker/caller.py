"""Who is asking: the node behind a request's API token, with its role and scopes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from m2kt.broker.errors import Forbidden
from m2kt.broker.models import Role
from m2kt.broker.security import allows

__all__ = ["Caller"]


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
        """Refuse (403 ``insufficient_scope``) unless the token grants ``needed`` (for ``topic``, if given)."""
        if not allows(self.scopes, needed, topic):
            what = f"publish to topic {topic!r}" if needed == "publish" else f"the '{needed}' scope"
            raise Forbidden(f"this token does not grant {what}", code="insufficient_scope")
