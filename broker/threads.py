"""Running blocking work (database, storage, hashing) from async code, on the worker thread pool."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import anyio.to_thread

__all__ = ["in_thread"]

T = TypeVar("T")


async def in_thread(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``func(*args, **kwargs)`` in a worker thread; the caller awaits it without blocking the event loop."""
    return await anyio.to_thread.run_sync(partial(func, *args, **kwargs))
