"""Does the broker stay as fast when its database holds a million packets?

    m2kt bench scale                          # 1,000,000 packets and events over 100 topics
    m2kt bench scale --rows 100000 --samples 50

Two brokers, one after the other, each on a database of its own (PostgreSQL) and the same nanio: a fresh
one, and one seeded directly in SQL (``INSERT … SELECT generate_series``, then ``ANALYZE``) with ``--rows``
packets spread over ``--topics`` topics, each with its ``published`` event, in lineage chains of ten, all
from one registered node and key, with the manifest of a real packet. On each, the same requests:

* **publish**: ``--samples`` distinct ~2 KB packets, one after the other (SDK), into a topic holding
  ``rows / topics`` events on the seeded database;
* **event page**: ``GET /v1/topics/{t}/packets?after=…&limit=100`` — the last hundred events of that topic;
* **lineage**: ``GET /v1/packets/{id}/lineage`` of a packet in the middle of a chain;
* **packet record**: ``GET /v1/packets/{id}``.

Prints p50 and p90 in milliseconds and the ratio seeded / fresh (target for publish and the event page:
within 1.5×), and the query plans of the statements these requests run on the seeded database.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg

from m2kt import BrokerClient
from m2kt.benchmarks.harness.brokers import Node, register_node
from m2kt.benchmarks.harness.packets import make_body, make_tensors
from m2kt.benchmarks.harness.results import write_results
from m2kt.benchmarks.harness.services import DEFAULT_DATABASE_URL, libpq_url
from m2kt.benchmarks.harness.stack import BrokerStack, broker_stack
from m2kt.format import write_packet

__all__ = ["main", "measure", "seed"]

CHAIN = 10  # lineage chains of this many packets


def seed(stack: BrokerStack, node: Node, rows: int, topics: int, manifest: dict[str, Any]) -> dict[str, Any]:
    """Insert ``rows`` packets, their events and lineage edges straight into the broker's database."""
    assert node.key is not None
    url = libpq_url(stack.broker.env["M2KT_DATABASE_URL"])
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        node_id = conn.execute("SELECT id FROM nodes WHERE name = %s", (node.name,)).fetchone()[0]  # type: ignore[index]
        fingerprint = node.key.verify_key.fingerprint
        conn.execute(
            "INSERT INTO topics (name, last_seq, created_at, created_by) "
            "SELECT 'seed.t' || g, 0, now(), %s FROM generate_series(1, %s) g",
            (node_id, topics),
        )
        safety = {"verdict": "pass", "action": "accepted", "threshold": 0.8, "declared_max": 0.03,
                  "over_threshold": [], "flagged": []}  # fmt: skip
        conn.execute(
            """
            INSERT INTO packets (id, topic_id, publisher_id, key_fingerprint, size, data_sha256, manifest, safety,
                                 status, storage_key, created_at)
            SELECT md5('p' || g) || md5('q' || g), t.id, %(node)s, %(fp)s, 2200, md5('d' || g) || md5('e' || g),
                   %(manifest)s::jsonb, %(safety)s::jsonb, 'accepted', 'packets/seed-' || g,
                   now() - make_interval(secs => %(rows)s - g)
            FROM generate_series(1, %(rows)s) g JOIN topics t ON t.name = 'seed.t' || (g %% %(topics)s + 1)
            """,
            {"node": node_id, "fp": fingerprint, "manifest": json.dumps(manifest), "safety": json.dumps(safety),
             "rows": rows, "topics": topics},
        )  # fmt: skip
        conn.execute(
            """
            INSERT INTO topic_events (topic_id, seq, kind, packet_id, created_at)
            SELECT topic_id, row_number() OVER (PARTITION BY topic_id ORDER BY created_at, id), 'published', id,
                   created_at
            FROM packets WHERE storage_key LIKE 'packets/seed-%%'
            """
        )
        conn.execute(
            "UPDATE topics SET last_seq = m.seq FROM (SELECT topic_id, max(seq) AS seq FROM topic_events "
            "GROUP BY topic_id) m WHERE m.topic_id = topics.id"
        )
        conn.execute(
            """
            INSERT INTO lineage_edges (parent_id, child_id)
            SELECT md5('p' || (g - 1)) || md5('q' || (g - 1)), md5('p' || g) || md5('q' || g)
            FROM generate_series(2, %(rows)s) g WHERE g %% %(chain)s <> 1
            """,
            {"rows": rows, "chain": CHAIN},
        )
        conn.execute("ANALYZE")
        counts = {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[index]
            for table in ("packets", "topic_events", "lineage_edges", "topics")
        }
    return {"seconds": time.perf_counter() - started, **counts}


def _timed(fn: Callable[[], None], samples: int) -> list[float]:
    out = []
    for _ in range(samples):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def measure(stack: BrokerStack, node: Node, tmp: Path, topic: str, chain_packet: str, samples: int) -> dict[str, Any]:
    """p50/p90 of publish, an event page, a lineage query and a packet record on this broker."""
    assert node.key is not None
    client = BrokerClient(stack.broker.url, node.token, quiet=True)
    http = httpx.Client(base_url=stack.broker.url, headers={"Authorization": f"Bearer {node.token}"}, timeout=60)
    try:
        paths = []
        for i in range(samples + 10):
            path = tmp / f"{uuid.uuid4().hex}.m2kt"
            body = make_body(topic=topic, created_at=datetime.now(UTC))
            write_packet(path, body, make_tensors(seed=i + 10_000 * len(str(tmp))), node.key)
            paths.append(path)
        for path in paths[:10]:  # warm: connections, the topic row, caches
            client.publish(path, topic)
        pending = iter(paths[10:])
        results = {"publish": _timed(lambda: client.publish(next(pending), topic), samples)}
        last = http.get(f"/v1/topics/{topic}").json()["last_seq"]

        def page() -> None:
            r = http.get(f"/v1/topics/{topic}/packets", params={"after": max(0, last - 100), "limit": 100})
            assert r.status_code == 200 and len(r.json()["items"]) == min(100, last), r.text[:300]

        def lineage() -> None:
            r = http.get(f"/v1/packets/{chain_packet}/lineage")
            assert r.status_code == 200, r.text[:300]

        def record() -> None:
            assert http.get(f"/v1/packets/{chain_packet}").status_code == 200

        for name, fn in (("event page", page), ("lineage", lineage), ("packet record", record)):
            fn()
            results[name] = _timed(fn, samples)
    finally:
        client.close()
        http.close()
    return {
        name: {"p50": statistics.median(ms), "p90": sorted(ms)[int(0.9 * (len(ms) - 1))], "samples": len(ms)}
        for name, ms in results.items()
    }


def _plans(stack: BrokerStack, topic: str, packet: str) -> list[str]:
    url = libpq_url(stack.broker.env["M2KT_DATABASE_URL"])
    statements = {
        "event page": (
            "SELECT e.* FROM topic_events e JOIN topics t ON t.id = e.topic_id "
            "WHERE t.name = %s AND e.seq > (SELECT last_seq - 100 FROM topics WHERE name = %s) "
            "ORDER BY e.seq LIMIT 100",
            (topic, topic),
        ),
        "lineage, ancestors": ("SELECT parent_id FROM lineage_edges WHERE child_id IN (%s)", (packet,)),
        "lineage, descendants": ("SELECT child_id FROM lineage_edges WHERE parent_id IN (%s)", (packet,)),
        "blob reference (GC, quota)": ("SELECT id FROM packets WHERE storage_key = %s LIMIT 1", ("packets/x",)),
        "topic packet count": (
            "SELECT count(*) FROM packets WHERE topic_id = (SELECT id FROM topics WHERE name = %s)",
            (topic,),
        ),
    }
    out = []
    with psycopg.connect(url) as conn:
        for name, (sql, params) in statements.items():
            plan = conn.execute("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY ON) " + sql, params).fetchall()
            out.append(f"{name}:\n" + "\n".join("    " + row[0] for row in plan))
    return out


def run(*, rows: int, topics: int, samples: int, database_url: str, log: Callable[[str], None]) -> dict[str, Any]:
    document: dict[str, Any] = {"settings": {"rows": rows, "topics": topics, "samples": samples}}
    with tempfile.TemporaryDirectory(prefix="m2kt-scale-") as tmp_name:
        tmp = Path(tmp_name)
        env = {"M2KT_UPLOAD_RATE_PER_MINUTE": "0"}
        for label in ("fresh", "seeded"):
            where = tmp / label
            where.mkdir()
            with broker_stack(where, database_url, where / "broker.log", extra_env=env) as stack:
                node = register_node(stack.broker.url, stack.admin_token, "teacher")
                assert node.key is not None
                if label == "seeded":
                    example = where / "example.m2kt"
                    write_packet(example, make_body(topic="seed.t1"), make_tensors(), node.key)
                    from m2kt.format import open_packet

                    with open_packet(example) as packet:
                        manifest = packet.manifest.model_dump(mode="json")
                    log(f"  seeding {rows:,} packets over {topics} topics …")
                    document["seed"] = seed(stack, node, rows, topics, manifest)
                    log(f"  seeded in {document['seed']['seconds']:.0f} s: {document['seed']}")
                    topic = "seed.t1"
                    middle = rows // 2 - (rows // 2) % CHAIN + CHAIN // 2
                    chain_packet = _seed_id(middle)
                else:
                    topic = "fresh.t1"
                    publisher = BrokerClient(stack.broker.url, node.token, quiet=True)
                    previous: str | None = None
                    for i in range(100):  # chains of ten for the lineage query; 100 events for a full page
                        path = where / f"chain{i}.m2kt"
                        parents = [previous] if previous and i % CHAIN else []
                        write_packet(path, make_body(topic=topic, parents=parents), make_tensors(seed=i), node.key)
                        previous = publisher.publish(path, topic).id
                        if i == 50 + CHAIN // 2:
                            chain_packet = previous
                    publisher.close()
                log(f"  measuring on the {label} database …")
                document[label] = measure(stack, node, where, topic, chain_packet, samples)
                if label == "seeded":
                    document["plans"] = _plans(stack, topic, chain_packet)
    document["ratios"] = {
        name: document["seeded"][name]["p50"] / document["fresh"][name]["p50"] for name in document["fresh"]
    }
    return document


def _seed_id(g: int) -> str:
    import hashlib

    return hashlib.md5(f"p{g}".encode()).hexdigest() + hashlib.md5(f"q{g}".encode()).hexdigest()


def markdown(document: dict[str, Any], command: str) -> str:
    s = document["settings"]
    seeded = document.get("seed", {})
    lines = [
        "# Broker at scale",
        "",
        f"`{command}`",
        "",
        f"Fresh database against one seeded with {seeded.get('packets', s['rows']):,} packets, "
        f"{seeded.get('topic_events', 0):,} events and {seeded.get('lineage_edges', 0):,} lineage edges over "
        f"{s['topics']} topics (seeded in {seeded.get('seconds', 0):.0f} s). {s['samples']} samples per request; "
        f"milliseconds. PostgreSQL + nanio on loopback, {os.cpu_count()} CPU(s).",
        "",
        "| request | fresh p50 | fresh p90 | seeded p50 | seeded p90 | seeded / fresh (p50) | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, ratio in document["ratios"].items():
        fresh, big = document["fresh"][name], document["seeded"][name]
        target = "≤ 1.5×" + (" ✓" if ratio <= 1.5 else " ✗") if name in ("publish", "event page") else ""
        lines.append(
            f"| {name} | {fresh['p50']:.1f} | {fresh['p90']:.1f} | {big['p50']:.1f} | {big['p90']:.1f} | "
            f"{ratio:.2f}× | {target} |"
        )
    lines += ["", "Query plans on the seeded database:", "", "```", *document.get("plans", []), "```"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="m2kt bench scale", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="packets (and events) to seed")
    parser.add_argument("--topics", type=int, default=100, help="topics they are spread over")
    parser.add_argument("--samples", type=int, default=100, help="requests timed per kind and database")
    parser.add_argument("--out", type=Path, default=None, help="write broker_scale.md and .json here")
    parser.add_argument("--database-url", default=os.environ.get("M2KT_TEST_DATABASE_URL", DEFAULT_DATABASE_URL))
    args = parser.parse_args(argv)
    if args.rows < CHAIN or args.topics < 1 or args.samples < 1:
        parser.error(f"--rows must be at least {CHAIN}, --topics and --samples at least 1")
    command = " ".join(["m2kt bench scale", *(sys.argv[1:] if argv is None else argv)])
    document = run(
        rows=args.rows,
        topics=args.topics,
        samples=args.samples,
        database_url=args.database_url,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    document["command"] = command
    table = markdown(document, command)
    print(table)
    if args.out is not None:
        write_results(args.out, "broker_scale", table, document)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
