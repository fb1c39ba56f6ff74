"""Subscribing under load: long-polls with a kept cursor, acknowledgements, losses and duplicates."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from m2kt import AsyncBrokerClient
from m2kt.benchmarks.load.parties import LoadConfig, Party
from m2kt.benchmarks.load.publish import RunState, error_code

# ----------------------------------------------------------------------------- subscribing


@dataclass
class Delivery:
    seq: int
    packet_id: str
    received: float


@dataclass
class SubscriberLog:
    name: str
    subscription: str
    deliveries: list[Delivery] = field(default_factory=list)
    other_events: int = 0
    polls: int = 0
    acks: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    fetch_seconds: list[float] = field(default_factory=list)
    leftover: list[str] = field(default_factory=list)  # ids still returned after the final cursor
    cursor: int = 0
    finished: bool = False

    def seen(self) -> set[str]:
        return {d.packet_id for d in self.deliveries}


async def poll(http: httpx.AsyncClient, log: SubscriberLog, wait: float, limit: int) -> dict[str, Any] | None:
    """One long-poll of the subscription; None (and a counted error) when it did not answer 200."""
    log.polls += 1
    try:
        r = await http.get(
            f"/v1/subscriptions/{log.subscription}/packets",
            params={"wait": wait, "limit": limit},
            timeout=wait + 30,
        )
    except httpx.TransportError as exc:
        log.errors[f"poll {type(exc).__name__}"] += 1
        return None
    if r.status_code != 200:
        log.errors[f"poll {r.status_code} {error_code(r)}"] += 1
        return None
    return r.json()


async def poll_unless_finished(
    http: httpx.AsyncClient, log: SubscriberLog, state: RunState, wait: float, limit: int
) -> tuple[bool, dict[str, Any] | None]:
    """(finished, page): a long-poll that is dropped when publishing ends and this subscriber has it all."""
    task = asyncio.ensure_future(poll(http, log, wait, limit))
    if not state.published.is_set():
        ended = asyncio.ensure_future(state.published.wait())
        await asyncio.wait({task, ended}, return_when=asyncio.FIRST_COMPLETED)
        ended.cancel()
        if not task.done() and set(state.accepted) <= log.seen():
            task.cancel()  # a GET: dropping it leaves the cursor where the last ack put it
            return True, None
    return False, await task


async def ack(http: httpx.AsyncClient, log: SubscriberLog, cursor: int) -> None:
    """Move the kept cursor; retried until it answers 200 (the cursor only moves forward)."""
    for attempt in range(10):
        try:
            r = await http.post(f"/v1/subscriptions/{log.subscription}/ack", json={"cursor": cursor})
        except httpx.TransportError as exc:
            log.errors[f"ack {type(exc).__name__}"] += 1
        else:
            if r.status_code == 200:
                log.acks += 1
                log.cursor = r.json()["cursor"]
                return
            log.errors[f"ack {r.status_code} {error_code(r)}"] += 1
        await asyncio.sleep(0.1 * 2**attempt)
    raise RuntimeError(f"{log.name}: the ack of cursor {cursor} failed 10 times")


async def handle(page: dict[str, Any], log: SubscriberLog, received: float, fetcher: Any, inbox: Path | None) -> None:
    """Record a page's events; with ``fetcher``, download and verify each published packet."""
    for item in page["items"]:
        if item["kind"] != "published":
            log.other_events += 1
            continue
        log.deliveries.append(Delivery(item["seq"], item["packet"]["id"], received))
        if fetcher is not None and inbox is not None:
            t0 = time.perf_counter()
            fetched = await fetcher.fetch(item["packet"]["id"], inbox)
            log.fetch_seconds.append(time.perf_counter() - t0)
            fetched.path.unlink()


async def run_subscriber(
    base_url: str, sub: Party, log: SubscriberLog, state: RunState, cfg: LoadConfig, deadline: float, inbox: Path
) -> None:
    """Consume the subscription until publishing has ended and every accepted packet is here."""
    headers = {"Authorization": f"Bearer {sub.token}"}
    fetcher = AsyncBrokerClient(base_url, sub.token, quiet=True, prefer_redirect=True) if cfg.fetch else None
    try:
        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as http:
            while True:
                if state.published.is_set() and set(state.accepted) <= log.seen():
                    break
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    return
                finished, page = await poll_unless_finished(http, log, state, min(cfg.wait, remaining), cfg.limit)
                if finished:
                    break
                if page is None:  # an error, counted: try again shortly
                    await asyncio.sleep(0.2)
                    continue
                await handle(page, log, time.perf_counter(), fetcher, inbox if cfg.fetch else None)
                if page["items"]:
                    await ack(http, log, page["cursor"])
            log.finished = True
    finally:
        if fetcher is not None:
            await fetcher.aclose()


async def leftovers(base_url: str, sub: Party, log: SubscriberLog) -> None:
    """After the run: what the subscription still returns after its acknowledged cursor (should be nothing)."""
    headers = {"Authorization": f"Bearer {sub.token}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as http:
        page = await poll(http, log, 0, 1000)
        if page is not None:
            log.leftover = [i["packet"]["id"] for i in page["items"] if i["kind"] == "published"]
        r = await http.get(f"/v1/subscriptions/{log.subscription}")
        if r.status_code == 200:
            log.cursor = r.json()["cursor"]
