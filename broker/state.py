"""What the broker process holds while it runs: settings, database, storage, the wake-up hub, metrics.

Plain data, no FastAPI: services take what they use from it; :mod:`m2kt.broker.deps` hands it to routes.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from m2kt.broker.metrics import Metrics
from m2kt.broker.pubsub import Hub
from m2kt.broker.ratelimit import UploadRateLimiter
from m2kt.broker.settings import Settings
from m2kt.broker.storage import BlobStore

__all__ = ["BrokerState"]


@dataclass
class BrokerState:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    reads: sessionmaker[Session]  # autocommit: for reads only (m2kt.broker.db.make_read_sessionmaker)
    storage: BlobStore
    hub: Hub
    metrics: Metrics
    uploads: UploadRateLimiter
    upload_threads: anyio.CapacityLimiter  # uploads' own worker threads (settings.upload_threads)
