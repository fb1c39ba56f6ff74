"""Running blocking work (database, storage, hashing) from async code, on the worker thread pool."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import anyio
import anyio.to_thread

__all__ = ["in_limited_thread", "in_thread"]

T = TypeVar("T")


async def in_thread(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``func(*args, **kwargs)`` in a worker thread; the caller awaits it without blocking the event loop."""
    return await anyio.to_thread.run_sync(partial(func, *args, **kwargs))


async def in_limited_thread(limiter: anyio.CapacityLimiter, func: Callable[..., T], *args: Any) -> T:
    """``func(*args)`` in a worker thread taken from ``limiter``'s share (a pool of its own, such as the
    uploads'), not from the default one the other requests use."""
    return await anyio.to_thread.run_sync(func, *args, limiter=limiter)
