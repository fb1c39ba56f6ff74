"""Publishing under load: one upload in flight per publisher, retried as the SDK retries."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from m2kt.benchmarks.load.parties import REQUEST_TIMEOUT, RETRY_STATUSES, Party
from m2kt.sdk.retry import parse_retry_after

# ----------------------------------------------------------------------------- publishing


@dataclass
class Outcome:
    """What became of one packet: every attempt's wall time, the last answer, the retries."""

    packet_id: str
    publisher: int
    size: int
    first_sent: float
    answered: float = 0.0
    status: int = 0
    code: str = ""
    record_status: str = ""
    attempts: int = 0
    request_seconds: list[float] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    retry_waits: list[float] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return self.status in (200, 201) and self.record_status == "accepted"


def error_code(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    return str(body.get("code", "")) if isinstance(body, dict) else ""


async def publish_one(
    http: httpx.AsyncClient,
    topic: str,
    packet_id: str,
    data: bytes,
    publisher: int,
    deadline: float,
    max_retries: int,
    sleep: Any = asyncio.sleep,
) -> Outcome:
    """POST one packet; retry on 429 (after ``Retry-After``), 5xx and no answer, until the deadline."""
    out = Outcome(packet_id, publisher, len(data), time.perf_counter())
    headers = {"Content-Type": "application/octet-stream"}
    while True:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            out.code = "deadline"
            return out
        t0 = time.perf_counter()
        out.attempts += 1
        retry_after: float | None = None
        try:
            r = await http.post(
                f"/v1/topics/{topic}/packets", content=data, headers=headers, timeout=min(REQUEST_TIMEOUT, remaining)
            )
            out.status, out.code = r.status_code, error_code(r) if r.status_code >= 400 else ""
            retry_after = parse_retry_after(r.headers.get("retry-after"))
            if r.status_code in (200, 201):
                record = r.json()
                out.record_status = record["status"]
                if record["id"] != packet_id:
                    out.code = f"id_mismatch:{record['id'][:16]}"
        except httpx.TransportError as exc:
            out.status, out.code = 0, type(exc).__name__
        out.answered = time.perf_counter()
        out.request_seconds.append(out.answered - t0)
        if out.status not in RETRY_STATUSES or out.attempts > max_retries:
            return out
        wait = retry_after if retry_after is not None else min(0.1 * 2 ** (out.attempts - 1), 5.0)
        if time.perf_counter() + wait >= deadline:
            out.code = f"deadline after {out.status} {out.code}".strip()
            return out
        out.retried.append(f"{out.status} {out.code}".strip())
        out.retry_waits.append(wait)
        await sleep(wait)


@dataclass
class RunState:
    """Shared by the coroutines: accepted packets so far, and whether publishing has ended."""

    accepted: dict[str, Outcome] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    published: asyncio.Event = field(default_factory=asyncio.Event)


async def run_publisher(
    base_url: str, pub: Party, index: int, topic: str, state: RunState, deadline: float, max_retries: int
) -> None:
    """Send this publisher's packets one after another, as fast as the broker answers."""
    headers = {"Authorization": f"Bearer {pub.token}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=REQUEST_TIMEOUT) as http:
        for packet_id, data in pub.packets:
            out = await publish_one(http, topic, packet_id, data, index, deadline, max_retries)
            state.outcomes.append(out)
            if out.accepted:
                state.accepted[packet_id] = out
