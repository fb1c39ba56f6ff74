"""The SDK: what a teacher or student node uses to talk to a broker, over httpx.

    from m2kt.sdk import BrokerClient
    with BrokerClient("http://127.0.0.1:8000", token="m2kt_…") as broker:
        broker.publish("k.m2kt", topic="arith.mod97")

Modules: ``client`` (:class:`BrokerClient`), ``async_client`` (:class:`AsyncBrokerClient`, the same
calls as coroutines), ``calls`` (every request described once, no I/O), ``records`` (what the broker
returns, typed), ``retry`` (backoff and ``Retry-After``), ``config`` (what ``m2kt login`` stores),
``progress`` (transfer bars). Errors are :mod:`m2kt.errors`. It never hands back an unverified packet:
fetches are checked with :mod:`m2kt.format` as they stream. No torch, no server code.
"""

from __future__ import annotations

from m2kt.sdk.async_client import AsyncBrokerClient
from m2kt.sdk.client import BrokerClient
from m2kt.sdk.retry import RetryPolicy

__all__ = ["AsyncBrokerClient", "BrokerClient", "RetryPolicy"]
