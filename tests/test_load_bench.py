"""The load run (m2kt.benchmarks.load): a miniature real run, and its retry and verdict logic.

The miniature run starts the real stack (nanio, a throw-away Postgres database, ``m2kt broker
serve``), publishes 4 × 3 packets to one topic with 2 subscribers and checks the written report:
nothing lost, nothing duplicated, every field there.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest

from m2kt.benchmarks.load import LoadConfig, Outcome, cpu_budget, failures, main, parse_args, publish_one
from tests.services import unavailable

SUMMARY_FIELDS = {"publish", "reference", "delivery", "broker_rss_mib", "cpu_seconds", "complete", "settings"}
PUBLISH_FIELDS = {"attempted", "accepted", "refused", "retries", "packets_per_s", "mb_per_s"}
PUBLISH_FIELDS |= {"request_latency_ms", "packet_latency_ms"}
DELIVERY_FIELDS = {"expected", "deliveries", "duplicates", "losses", "unknown", "subscribers"}
DELIVERY_FIELDS |= {"latency_from_send_ms", "latency_from_201_ms", "max_duplicates_per_subscriber"}
LATENCY_FIELDS = {"n", "p50", "p95", "p99", "max"}


@pytest.fixture
def nanio() -> None:
    if shutil.which("nanio") is None and not Path(sys.executable).with_name("nanio").exists():
        unavailable("nanio is not installed (pip install -e '.[test]')")


def test_miniature_load_run_loses_and_duplicates_nothing(postgres_url: str, nanio: None, tmp_path: Path) -> None:
    out = tmp_path / "results"
    argv = ["--publishers", "4", "--packets", "3", "--subscribers", "2", "--timeout", "60"]
    argv += ["--wait", "2", "--out", str(out), "--database-url", postgres_url, "--dir", str(tmp_path)]
    assert main(argv) == 0

    report = json.loads((out / "load.json").read_text())
    assert SUMMARY_FIELDS <= set(report)
    publish, delivery, rss = report["publish"], report["delivery"], report["broker_rss_mib"]
    assert PUBLISH_FIELDS <= set(publish) and DELIVERY_FIELDS <= set(delivery)
    assert report["complete"] is True
    assert publish["attempted"] == publish["accepted"] == 12 and publish["refused"] == {}
    assert delivery["expected"] == delivery["deliveries"] == 24
    assert delivery["losses"] == delivery["duplicates"] == delivery["unknown"] == 0
    for sub in delivery["subscribers"]:
        assert (sub["deliveries"], sub["losses"], sub["duplicates"], sub["left_after_cursor"]) == (12, 0, 0, 0)
        assert sub["cursor"] == sub["last_seq_seen"] and sub["out_of_order"] == 0
    for latency in (publish["request_latency_ms"], delivery["latency_from_send_ms"], report["reference"]["latency_ms"]):
        assert set(latency) == LATENCY_FIELDS and latency["n"] > 0 and 0 < latency["p50"] <= latency["p99"]
    assert delivery["latency_from_send_ms"]["n"] == 24
    assert 0 < rss["before"] <= rss["peak"] and rss["after"] > 0 and rss["samples"] > 0
    assert report["throughput_vs_raw_s3"] > 0
    assert report["environment"]["broker_env"] == {"M2KT_UPLOAD_RATE_PER_MINUTE": "0"}

    budget = report["cpu_budget"]
    assert budget["cpus"] == report["environment"]["cpus"] and budget["cpu_seconds_per_1000"]["client"] > 0
    assert budget["ceiling_packets_per_s"] >= budget["at_this_cpu_packets_per_s"] > 0

    table = (out / "load.md").read_text()
    assert "**PASS** — 0 lost, 0 duplicated per subscriber cursor" in table
    assert "with a broker that used no CPU at all this run could not pass" in table
    for row in ("publish via broker", "raw S3 put_object", "publish → delivery (from the first send)", "broker RSS"):
        assert row in table


def _answers(*responses: httpx.Response) -> httpx.MockTransport:
    queue = list(responses)
    return httpx.MockTransport(lambda request: queue.pop(0))


def test_publish_honours_retry_after_and_counts_retries() -> None:
    record = {"id": "abc", "status": "accepted"}
    transport = _answers(
        httpx.Response(429, json={"code": "rate_limited", "message": "slow down"}, headers={"Retry-After": "2"}),
        httpx.Response(503, json={"code": "database_unavailable", "message": "down"}),
        httpx.Response(201, json=record),
    )
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    async def go() -> Outcome:
        async with httpx.AsyncClient(base_url="http://broker", transport=transport) as http:
            return await publish_one(http, "t", "abc", b"bytes", 0, time.perf_counter() + 60, 5, sleep)

    out = asyncio.run(go())
    assert out.accepted and out.status == 201 and out.attempts == 3
    assert out.retried == ["429 rate_limited", "503 database_unavailable"]
    assert waits == [2.0, 0.2] and len(out.request_seconds) == 3


def test_publish_gives_up_on_refusals_and_at_the_deadline() -> None:
    async def go(transport: httpx.MockTransport, deadline: float) -> Outcome:
        async with httpx.AsyncClient(base_url="http://broker", transport=transport) as http:
            return await publish_one(http, "t", "abc", b"x", 0, deadline, 5)

    refused = asyncio.run(go(_answers(httpx.Response(422, json={"code": "bad_signature", "message": "no"})), 1e18))
    assert not refused.accepted and (refused.status, refused.code, refused.attempts) == (422, "bad_signature", 1)
    late = _answers(httpx.Response(429, json={"code": "rate_limited", "message": "m"}, headers={"Retry-After": "30"}))
    cut = asyncio.run(go(late, time.perf_counter() + 5))
    assert not cut.accepted and cut.code.startswith("deadline") and cut.retried == []


def test_verdict_names_losses_duplicates_and_an_incomplete_run() -> None:
    report = {
        "delivery": {"losses": 2, "duplicates": 1, "unknown": 0},
        "publish": {"refused": {"429 rate_limited": 1}, "not_attempted": 0},
        "complete": False,
        "cut_short": ["at the deadline 1 publisher(s), 0 subscriber(s) ran"],
    }
    found = " | ".join(failures(report))
    assert "2 lost" in found and "1 duplicate" in found and "429 rate_limited" in found and "incomplete" in found
    report = {
        "delivery": {"losses": 0, "duplicates": 0, "unknown": 0},
        "publish": {"refused": {}, "not_attempted": 0},
        "complete": True,
        "cut_short": [],
    }
    assert failures(report) == []


def test_rate_limit_is_off_unless_asked_for() -> None:
    assert LoadConfig().broker_env() == {"M2KT_UPLOAD_RATE_PER_MINUTE": "0"}
    cfg, out, _ = parse_args(["--rate-limit", "--publishers", "2", "--out", "x"])
    assert cfg.broker_env() == {} and cfg.publishers == 2 and out == Path("x")
    cfg, _, _ = parse_args(["--upload-rate", "60", "--upload-burst", "1"])
    assert cfg.broker_env() == {"M2KT_UPLOAD_RATE_PER_MINUTE": "60", "M2KT_UPLOAD_BURST": "1"}


def test_cpu_budget_is_the_rate_the_cores_allow_with_and_without_the_broker() -> None:
    """2 cores; per 1,000 packets the client, nanio and Postgres take 7 + 2.5 + 2.5 = 12 CPU-s and the broker 11:
    the cores allow 2,000 / 12 packets/s with a broker that costs nothing, 2,000 / 23 with this one."""
    report = {
        "publish": {"accepted": 500},
        "cpu_seconds": {"client": 3.5, "broker": 5.5, "nanio": 1.25, "postgres": 1.25, "machine": 13.0},
        "environment": {"cpus": 2},
    }
    budget = cpu_budget(report)
    assert budget is not None
    assert budget["cpu_seconds_per_1000"] == {
        "client": 7.0,
        "broker": 11.0,
        "nanio": 2.5,
        "postgres": 2.5,
        "machine": 26.0,
    }
    assert budget["ceiling_packets_per_s"] == pytest.approx(2000 / 12)
    assert budget["at_this_cpu_packets_per_s"] == pytest.approx(2000 / 23)
    assert cpu_budget({**report, "publish": {"accepted": 0}}) is None
