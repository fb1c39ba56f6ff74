"""Where a small upload's time goes: p50 of each stage of the broker's upload path, in one process.

    python -m m2kt.benchmarks.upload_stages [--uploads 300]
    PYTHONPATH=/path/to/older/checkout python -m m2kt.benchmarks.upload_stages    # the same for older code

The broker app runs in this process (uvicorn on a loopback socket, PostgreSQL, nanio) with timers wrapped
around the functions of the upload path that exist in the code being measured (authentication, the header
check, the safety check, the commit transaction and inside it the publisher re-check, the storage put and
the event append); ``--uploads`` distinct ~2 KB packets are then published one after another. It also
counts the statements SQLAlchemy executes per upload (not those sent on the driver directly: reads and
pipelines on Postgres) and times a page of 100 events, and raw ``put_object`` of the same
bytes. Client and broker share this process (and its interpreter lock), so the absolute figures are higher
than a broker process's; they are for comparing stages and code versions on one machine.
"""

from __future__ import annotations

import argparse
import inspect
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import event

import m2kt
from m2kt.benchmarks.harness.brokers import (
    create_database,
    drop_database,
    register_node,
    s3_broker_app,
    uvicorn_thread,
)
from m2kt.benchmarks.harness.packets import packet_bytes
from m2kt.benchmarks.harness.services import DEFAULT_DATABASE_URL, start_nanio

__all__ = ["main"]

STAGES = {
    "m2kt.broker.services.auth": ["authenticate"],
    "m2kt.broker.services.upload": [
        "receive_packet",
        "_check_header",
        "_safety",
        "_store_and_commit",
        "_recheck_publisher",
        "append_event",
    ],
}


def _timed(times: dict[str, list[float]], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(fn):

        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                times[name].append(time.perf_counter() - t0)

        return timed_async

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[name].append(time.perf_counter() - t0)

    return timed


def instrument(times: dict[str, list[float]]) -> None:
    """Wrap every stage that exists, in its module and wherever it was imported by name."""
    import importlib

    from m2kt.broker.storage.base import StagedUpload

    for module_name, names in STAGES.items():
        module = importlib.import_module(module_name)
        for name in names:
            original = getattr(module, name, None)
            if original is None:
                continue
            wrapped = _timed(times, name, original)
            for other in list(sys.modules.values()):
                if (
                    other is not None
                    and other.__name__.startswith("m2kt.broker")
                    and getattr(other, name, None) is original
                ):
                    setattr(other, name, wrapped)
    StagedUpload.complete = _timed(times, "storage put (complete)", StagedUpload.complete)  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m m2kt.benchmarks.upload_stages", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--uploads", type=int, default=300, help="timed uploads (default 300)")
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    args = parser.parse_args(argv)

    from m2kt.broker.db import upgrade

    times: dict[str, list[float]] = defaultdict(list)
    instrument(times)
    with tempfile.TemporaryDirectory(prefix="m2kt-stages-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "s3").mkdir()
        nanio, s3 = start_nanio(tmp / "s3", "stages", "stages-" + secrets.token_hex(8), log_path=tmp / "nanio.log")
        database = create_database(args.database_url)
        try:
            upgrade(database)
            bucket = f"stages-{uuid.uuid4().hex[:8]}"
            s3.client().create_bucket(Bucket=bucket)
            token = "m2kt_admin_" + uuid.uuid4().hex
            app = s3_broker_app(database, s3, bucket, tmp, token, upload_rate_per_minute=0)
            with uvicorn_thread(app) as url:
                node = register_node(url, token, "teacher")
                assert node.key is not None
                bodies = [packet_bytes(tmp, node.key, "stages.t", seed=i) for i in range(args.uploads + 20)]
                for body in bodies[:20]:  # warm: connections, the topic row
                    assert node.http.post("/v1/topics/stages.t/packets", content=body).status_code == 201
                statements = [0]
                engine = app.state.broker.sessions.kw["bind"]
                event.listen(engine, "before_cursor_execute", lambda *a: statements.__setitem__(0, statements[0] + 1))
                times.clear()
                whole = []
                for body in bodies[20:]:
                    t0 = time.perf_counter()
                    assert node.http.post("/v1/topics/stages.t/packets", content=body).status_code == 201
                    whole.append(time.perf_counter() - t0)
                pages = []
                for _ in range(100):
                    t0 = time.perf_counter()
                    node.http.get("/v1/topics/stages.t/packets", params={"after": 0, "limit": 100})
                    pages.append(time.perf_counter() - t0)
                raw = []
                client = s3.client()
                for i, body in enumerate(bodies[20:]):
                    t0 = time.perf_counter()
                    client.put_object(Bucket=bucket, Key=f"raw/{i}", Body=body)
                    raw.append(time.perf_counter() - t0)
        finally:
            nanio.terminate()
            drop_database(database)

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:7.2f}"

    n = args.uploads
    print(f"code: {Path(m2kt.__file__).parent}; {n} uploads of ~2 KB; p50 in ms\n")
    print("| stage | p50 ms | calls per upload |\n|---|---|---|")
    counted = f"{statements[0] / n:.1f} SQLAlchemy statements (driver reads and pipelines not counted)"
    print(f"| whole request, seen by the client | {ms(whole)} | {counted} |")
    for name, values in times.items():
        print(f"| {name} | {ms(values)} | {len(values) / n:.0f} |")
    print(f"| GET a page of 100 events | {ms(pages)} | |")
    print(f"| raw put_object of the same bytes | {ms(raw)} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
