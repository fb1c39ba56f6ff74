"""Per-node caps on what one node holds open at once: packet uploads, and event streams (SSE and
long-polls with ``?wait=``).

Each cap is a counter per node id, taken for the whole request — for a stream, until the stream ends —
by a FastAPI dependency that comes after the token and scope check (strangers never reach it). Past
the cap the request is answered 429 with a stable code and ``Retry-After``:

* ``too_many_uploads`` — ``M2KT_MAX_UPLOADS_PER_NODE`` uploads already in progress;
* ``too_many_streams`` — ``M2KT_MAX_STREAMS_PER_NODE`` SSE streams / long-polls already open.

The counters live in the broker process: with several replicas, a node may hold the cap on each.
Plain Python, no web framework: routes take a slot with the dependencies of :mod:`m2kt.broker.routes.slots`
(``UploadSlot``, ``StreamSlot``, ``LongPollSlot``), one more parameter each.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from m2kt.broker.caller import Caller
from m2kt.broker.errors import TooManyRequests
from m2kt.broker.settings import Settings

__all__ = ["RETRY_AFTER_SECONDS", "NodeConcurrency", "NodeSlots", "install_node_concurrency"]

#: Seconds a refused node is asked to wait (``Retry-After``) before trying again.
RETRY_AFTER_SECONDS = 5


class NodeSlots:
    """At most ``limit`` of one kind of request per node at a time."""

    def __init__(self, limit: int, *, what: str, code: str, setting: str) -> None:
        if limit < 1:
            raise ValueError(f"{setting} must be at least 1")
        self.limit = limit
        self.what = what
        self.code = code
        self.setting = setting
        self._held: dict[int, int] = {}
        self._lock = threading.Lock()

    def in_use(self, node_id: int) -> int:
        with self._lock:
            return self._held.get(node_id, 0)

    def held(self) -> dict[int, int]:
        """Slots in use, by node id (a copy)."""
        with self._lock:
            return dict(self._held)

    def try_acquire(self, node_id: int) -> bool:
        with self._lock:
            held = self._held.get(node_id, 0)
            if held >= self.limit:
                return False
            self._held[node_id] = held + 1
            return True

    def release(self, node_id: int) -> None:
        with self._lock:
            held = self._held.get(node_id, 0) - 1
            if held > 0:
                self._held[node_id] = held
            else:
                self._held.pop(node_id, None)

    def refusal(self, caller: Caller) -> TooManyRequests:
        return TooManyRequests(
            f"node {caller.node!r} already has {self.limit} {self.what} open, the most one node may have at once "
            f"({self.setting}); finish or close one, then retry",
            code=self.code,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )

    @contextmanager
    def hold(self, caller: Caller) -> Iterator[None]:
        """One slot for ``caller``'s node while the block runs; 429 (``self.code``) when none is free."""
        if not self.try_acquire(caller.node_id):
            raise self.refusal(caller)
        try:
            yield
        finally:
            self.release(caller.node_id)


@dataclass
class NodeConcurrency:
    uploads: NodeSlots
    streams: NodeSlots

    @classmethod
    def from_settings(cls, settings: Settings) -> NodeConcurrency:
        return cls(
            uploads=NodeSlots(
                settings.max_uploads_per_node,
                what="uploads",
                code="too_many_uploads",
                setting="M2KT_MAX_UPLOADS_PER_NODE",
            ),
            streams=NodeSlots(
                settings.max_streams_per_node,
                what="event streams (SSE or long-polls)",
                code="too_many_streams",
                setting="M2KT_MAX_STREAMS_PER_NODE",
            ),
        )


def install_node_concurrency(app: Any, settings: Settings) -> NodeConcurrency:
    """Create the app's counters (``app.state.node_concurrency``)."""
    limits = NodeConcurrency.from_settings(settings)
    app.state.node_concurrency = limits
    return limits
