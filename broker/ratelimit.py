"""Per-node upload rate limiting: a token bucket per node, kept in the broker process.

Each node may send ``burst`` uploads at once, then ``per_minute`` a minute. Every upload attempt
counts, refused ones included, so a node cannot flood the validator with garbage either. The
buckets live in memory: with several broker replicas behind a load balancer, a node's effective
limit is the per-replica limit times the replicas it reaches (documented in SECURITY.md).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class UploadRateLimiter:
    """``take(node_id)`` returns 0 when an upload may go ahead, else the seconds to wait."""

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second = per_minute / 60.0
        self.burst = burst
        self.clock = clock
        self._buckets: dict[int, _Bucket] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.per_second > 0

    def take(self, node_id: int) -> float:
        if not self.enabled:
            return 0.0
        now = self.clock()
        with self._lock:
            bucket = self._buckets.get(node_id)
            if bucket is None:
                bucket = self._buckets[node_id] = _Bucket(float(self.burst), now)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.per_second)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.per_second

    @staticmethod
    def retry_after(wait_seconds: float) -> str:
        """The ``Retry-After`` header value: whole seconds, at least 1."""
        return str(max(1, math.ceil(wait_seconds)))
