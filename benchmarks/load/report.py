"""The load run's report: latency percentiles, losses and duplicates per cursor, the Markdown table."""

from __future__ import annotations

import os
import platform
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from m2kt.benchmarks.broker_memory import CPUTimes, MiB, RSSSampler
from m2kt.benchmarks.load.parties import LoadConfig
from m2kt.benchmarks.load.publish import RunState
from m2kt.benchmarks.load.subscribe import SubscriberLog

# ----------------------------------------------------------------------------- the report


@dataclass
class LoadPhase:
    state: RunState
    logs: list[SubscriberLog]
    loadavg: tuple[tuple[float, ...], tuple[float, ...]]  # the machine's 1/5/15-min load, before and after
    started: float
    publish_ended: float
    ended: float
    complete: bool
    cut_short: list[str]


@dataclass
class Reference:
    seconds: float
    put_seconds: list[float]
    count: int
    size: int


def percentiles(seconds: list[float]) -> dict[str, float | int | None]:
    """n, p50, p95, p99 and max, in milliseconds."""
    if not seconds:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"n": len(ms), "p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(ms.max())}


def subscriber_summary(log: SubscriberLog, accepted: set[str]) -> dict[str, Any]:
    ids = [d.packet_id for d in log.deliveries]
    seqs = [d.seq for d in log.deliveries]
    seen = set(ids)
    return {
        "name": log.name,
        "subscription": log.subscription,
        "deliveries": len(ids),
        "duplicates": (len(ids) - len(seen)) + sum(1 for i in log.leftover if i in seen),
        "duplicate_seqs": len(seqs) - len(set(seqs)),
        "out_of_order": sum(1 for a, b in zip(seqs, seqs[1:], strict=False) if b <= a),
        "seq_gaps": len(set(range(1, max(seqs, default=0) + 1)) - set(seqs)),
        "losses": len(accepted - seen),
        "unknown": len(seen - accepted) + sum(1 for i in log.leftover if i not in seen),
        "left_after_cursor": len(log.leftover),
        "other_events": log.other_events,
        "cursor": log.cursor,
        "last_seq_seen": max(seqs, default=0),
        "polls": log.polls,
        "acks": log.acks,
        "errors": dict(log.errors),
        "finished": log.finished,
    }


def delivery_latencies(phase: LoadPhase) -> tuple[list[float], list[float]]:
    """(from the first send, from the publisher's 201) for each first delivery of an accepted packet."""
    from_send: list[float] = []
    from_answer: list[float] = []
    for log in phase.logs:
        first: set[str] = set()
        for d in log.deliveries:
            out = phase.state.accepted.get(d.packet_id)
            if out is None or d.packet_id in first:
                continue
            first.add(d.packet_id)
            from_send.append(d.received - out.first_sent)
            from_answer.append(d.received - out.answered)
    return from_send, from_answer


def publish_summary(phase: LoadPhase, cfg: LoadConfig) -> dict[str, Any]:
    outcomes = phase.state.outcomes
    accepted = [o for o in outcomes if o.accepted]
    refused = Counter(f"{o.status} {o.code or o.record_status}".strip() for o in outcomes if not o.accepted)
    last = max((o.answered for o in accepted), default=phase.started)
    seconds = max(last - phase.started, 1e-9)
    nbytes = sum(o.size for o in accepted)
    return {
        "attempted": len(outcomes),
        "not_attempted": cfg.publishers * cfg.packets - len(outcomes),
        "accepted": len(accepted),
        "created": sum(1 for o in accepted if o.status == 201),
        "refused": dict(refused),
        "requests": sum(o.attempts for o in outcomes),
        "retries": sum(len(o.retried) for o in outcomes),
        "retried_on": dict(Counter(r for o in outcomes for r in o.retried)),
        "retry_wait_seconds": sum(sum(o.retry_waits) for o in outcomes),
        "bytes": nbytes,
        "mean_packet_bytes": nbytes / len(accepted) if accepted else 0,
        "seconds": seconds,
        "packets_per_s": len(accepted) / seconds,
        "mb_per_s": nbytes / 1e6 / seconds,
        "request_latency_ms": percentiles([s for o in outcomes for s in o.request_seconds]),
        "packet_latency_ms": percentiles([o.answered - o.first_sent for o in accepted]),
    }


def build_report(
    cfg: LoadConfig,
    phase: LoadPhase,
    ref: Reference,
    rss: RSSSampler,
    cpu: CPUTimes,
    topic: str,
    problems: list[str],
    command: str,
) -> dict[str, Any]:
    accepted = set(phase.state.accepted)
    subscribers = [subscriber_summary(log, accepted) for log in phase.logs]
    publish = publish_summary(phase, cfg)
    from_send, from_answer = delivery_latencies(phase)
    ref_rate = ref.count / ref.seconds if ref.seconds else 0.0
    totals = {k: sum(s[k] for s in subscribers) for k in ("deliveries", "duplicates", "losses", "unknown")}
    return {
        "command": command,
        "environment": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "broker_env": cfg.broker_env(),
            "loadavg_before": list(phase.loadavg[0]),
            "loadavg_after": list(phase.loadavg[1]),
        },
        "settings": {**asdict(cfg), "topic": topic, "database_url": None},
        "complete": phase.complete,
        "cut_short": phase.cut_short,
        "elapsed_s": phase.ended - phase.started,
        "publish_phase_s": phase.publish_ended - phase.started,
        "publish": publish,
        "reference": {
            "name": "raw S3 put_object (boto3), same bytes, same concurrency",
            "count": ref.count,
            "bytes": ref.size,
            "seconds": ref.seconds,
            "packets_per_s": ref_rate,
            "mb_per_s": ref.size / 1e6 / ref.seconds if ref.seconds else 0.0,
            "latency_ms": percentiles(ref.put_seconds),
        },
        "throughput_vs_raw_s3": publish["packets_per_s"] / ref_rate if ref_rate else None,
        "delivery": {
            "expected": len(accepted) * len(subscribers),
            **totals,
            "max_duplicates_per_subscriber": max((s["duplicates"] for s in subscribers), default=0),
            "max_losses_per_subscriber": max((s["losses"] for s in subscribers), default=0),
            "latency_from_send_ms": percentiles(from_send),
            "latency_from_201_ms": percentiles(from_answer),
            "fetch_latency_ms": percentiles([s for log in phase.logs for s in log.fetch_seconds]),
            "subscribers": subscribers,
        },
        "broker_rss_mib": {
            "before": rss.baseline / MiB,
            "peak": rss.peak / MiB,
            "after": rss.final / MiB,
            "samples": rss.samples,
        },
        "cpu_seconds": cpu.used,
        "broker_log_problems": problems[:50],
    }


def failures(report: dict[str, Any]) -> list[str]:
    """Why the run failed, if it did: losses, duplicates, unknown deliveries, refusals, the deadline."""
    d, p = report["delivery"], report["publish"]
    out = []
    if d["losses"]:
        out.append(f"{d['losses']} lost deliveries")
    if d["duplicates"]:
        out.append(f"{d['duplicates']} duplicate deliveries")
    if d["unknown"]:
        out.append(f"{d['unknown']} deliveries of packets no publisher saw accepted")
    if p["refused"] or p["not_attempted"]:
        out.append(f"publishes not accepted: {p['refused'] or {}} (+{p['not_attempted']} not attempted)")
    if not report["complete"]:
        out.append("incomplete: " + "; ".join(report["cut_short"]))
    return out


def _ms(v: float | int | None) -> str:
    return "—" if v is None else f"{v:,.1f}"


def latency_row(name: str, p: dict[str, Any]) -> str:
    cells = " | ".join(f"{_ms(p[k]):>8}" for k in ("p50", "p95", "p99", "max"))
    return f"| {name:<46} | {p['n']:>6} | {cells} |"


def render(report: dict[str, Any]) -> str:
    """The Markdown report: counts, throughput against raw S3, latencies, broker RSS and CPU, per subscriber."""
    s, p, d, ref = report["settings"], report["publish"], report["delivery"], report["reference"]
    env, rss, cpu = report["environment"], report["broker_rss_mib"], report["cpu_seconds"]
    verdict = failures(report)
    limits = ", ".join(f"{k}={v}" for k, v in env["broker_env"].items()) or "broker defaults"
    lines = [
        "# Load run",
        "",
        f"`{report['command']}`",
        "",
        f"{s['publishers']} publishers × {s['packets']} packets → one topic (`{s['topic']}`), "
        f"{s['subscribers']} subscriber{'s' if s['subscribers'] != 1 else ''} "
        f"(long-poll + ack{', fetch + verify' if s['fetch'] else ''}); "
        f"broker on Postgres + nanio (loopback), {s.get('workers', 1)} worker process(es); {env['cpus']} CPU(s); "
        f"upload limits: {limits}; "
        f"packets {p['mean_packet_bytes']:,.0f} bytes on average; deadline {s['timeout']:g} s, "
        f"run {'complete' if report['complete'] else 'INCOMPLETE'} in {report['elapsed_s']:.1f} s; "
        f"machine load average (1 min) {env['loadavg_before'][0]:.1f} before, {env['loadavg_after'][0]:.1f} after "
        "(anything else running shares the cores: see 'other' CPU below).",
        "",
        f"**{'PASS' if not verdict else 'FAIL'}** — {d['losses']} lost, "
        f"{d['max_duplicates_per_subscriber']} duplicated per subscriber cursor (max; {d['duplicates']} in all), "
        f"{d['unknown']} unknown" + (f"; {'; '.join(verdict)}" if verdict else ""),
        "",
        f"| {'count':<46} | {'value':>32} |",
        f"|{'-' * 48}|{'-' * 34}|",
    ]
    refused = ", ".join(f"{k}: {v}" for k, v in p["refused"].items()) or "0"
    retried = ", ".join(f"{k}: {v}" for k, v in p["retried_on"].items())
    counts = [
        ("publishers × packets (attempted)", f"{s['publishers']} × {s['packets']} ({p['attempted']})"),
        ("accepted (201 / 200)", f"{p['accepted']} ({p['created']} / {p['accepted'] - p['created']})"),
        ("refused (status code)", refused),
        ("not attempted (deadline)", str(p["not_attempted"])),
        ("publish requests / retries", f"{p['requests']} / {p['retries']}" + (f" ({retried})" if retried else "")),
        ("subscribers", str(s["subscribers"])),
        ("deliveries / expected (accepted × subscribers)", f"{d['deliveries']} / {d['expected']}"),
        ("duplicates per subscriber (max / total)", f"{d['max_duplicates_per_subscriber']} / {d['duplicates']}"),
        ("losses per subscriber (max / total)", f"{d['max_losses_per_subscriber']} / {d['losses']}"),
        ("unknown deliveries", str(d["unknown"])),
    ]
    lines += [f"| {k:<46} | {v:>32} |" for k, v in counts]
    ratio = report["throughput_vs_raw_s3"]
    lines += [
        "",
        f"| {'throughput':<46} | {'packets':>7} | {'seconds':>7} | {'packets/s':>9} | {'MB/s':>6} | {'× raw S3':>8} |",
        f"|{'-' * 48}|{'-' * 9}|{'-' * 9}|{'-' * 11}|{'-' * 8}|{'-' * 10}|",
        f"| {'publish via broker (POST, all at once)':<46} | {p['accepted']:>7} | {p['seconds']:>7.2f} "
        f"| {p['packets_per_s']:>9,.1f} | {p['mb_per_s']:>6.2f} | {_ratio(ratio):>8} |",
        f"| {'raw S3 put_object, boto3 (reference)':<46} | {ref['count']:>7} | {ref['seconds']:>7.2f} "
        f"| {ref['packets_per_s']:>9,.1f} | {ref['mb_per_s']:>6.2f} | {'1.00':>8} |",
        "",
        f"| {'latency (ms)':<46} | {'n':>6} | {'p50':>8} | {'p95':>8} | {'p99':>8} | {'max':>8} |",
        f"|{'-' * 48}|{'-' * 8}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|",
        latency_row("publish request (POST → answer)", p["request_latency_ms"]),
        latency_row("publish, first send → accepted (with retries)", p["packet_latency_ms"]),
        latency_row("raw S3 put_object (reference)", ref["latency_ms"]),
        latency_row("publish → delivery (from the first send)", d["latency_from_send_ms"]),
        latency_row("publish → delivery (from the publisher's 201)", d["latency_from_201_ms"]),
    ]
    if d["fetch_latency_ms"]["n"]:
        lines.append(latency_row("fetch + verify one delivered packet", d["fetch_latency_ms"]))
    lines += [
        "",
        f"| {'broker RSS (MiB)':<46} | {'before':>8} | {'peak':>8} | {'after':>8} | {'samples':>8} |",
        f"|{'-' * 48}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|",
        f"| {'during the load':<46} | {rss['before']:>8.1f} | {rss['peak']:>8.1f} | {rss['after']:>8.1f} "
        f"| {rss['samples']:>8} |",
        "",
        f"| {'CPU seconds during the load':<46} |  client |  broker |   nanio | postgres | machine |   other |",
        f"|{'-' * 48}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 10}|{'-' * 9}|{'-' * 9}|",
        f"| {'(postgres: its backends for this database)':<46} | "
        + " | ".join(f"{cpu.get(n, 0.0):>7.2f}" for n in ("client", "broker", "nanio"))
        + f" | {cpu.get('postgres', 0.0):>8.2f} | {cpu['machine']:>7.2f} | {other_cpu(cpu):>7.2f} |",
        *_budget_lines(report),
        "",
        "| subscriber | deliveries | duplicates | losses | unknown | left after cursor | cursor | polls | acks "
        "| errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sub in d["subscribers"]:
        errors = ", ".join(f"{k}: {v}" for k, v in sub["errors"].items()) or "0"
        lines.append(
            f"| {sub['subscription']} | {sub['deliveries']} | {sub['duplicates']} | {sub['losses']} | {sub['unknown']} "
            f"| {sub['left_after_cursor']} | {sub['cursor']} | {sub['polls']} | {sub['acks']} | {errors} |"
        )
    problems = report["broker_log_problems"]
    lines += ["", f"broker log: {len(problems)} line(s) look like errors" if problems else "broker log: no errors"]
    lines += [f"    {ln}" for ln in problems[:20]]
    return "\n".join(lines) + "\n"


_PARTIES = ("client", "broker", "nanio", "postgres")


def cpu_budget(report: dict[str, Any]) -> dict[str, Any] | None:
    """CPU seconds per 1,000 accepted packets, by process, and what they allow on this machine's cores.

    ``ceiling_packets_per_s``: the rate at which the run's processes other than the broker (the client, nanio
    and Postgres) alone would keep every core busy, i.e. the most a broker that used no CPU at all could reach
    here; ``at_this_cpu_packets_per_s``: the same with the broker's measured CPU counted too. ``None`` when
    nothing was accepted."""
    accepted = report["publish"]["accepted"]
    if not accepted:
        return None
    cpu, cpus = report["cpu_seconds"], report["environment"]["cpus"]
    per = {name: cpu.get(name, 0.0) * 1000 / accepted for name in _PARTIES}
    per["machine"] = cpu["machine"] * 1000 / accepted
    outside = per["client"] + per["nanio"] + per["postgres"]
    return {
        "cpu_seconds_per_1000": per,
        "outside_broker_per_1000": outside,
        "cpus": cpus,
        "ceiling_packets_per_s": cpus * 1000 / outside if outside > 0 else None,
        "at_this_cpu_packets_per_s": cpus * 1000 / (outside + per["broker"]) if outside + per["broker"] > 0 else None,
    }


def _budget_lines(report: dict[str, Any]) -> list[str]:
    budget = report.get("cpu_budget")  # set by the run once Postgres's CPU is in
    if budget is None:
        return []
    per = budget["cpu_seconds_per_1000"]
    cells = " | ".join(f"{per[name]:>7.2f}" for name in ("client", "broker", "nanio"))
    lines = [
        f"| {'per 1,000 accepted packets':<46} | {cells} | {per['postgres']:>8.2f} | {per['machine']:>7.2f} |"
        f" {'':>7} |",
    ]
    if budget["ceiling_packets_per_s"] is not None:
        lines += [
            "",
            f"On {budget['cpus']} CPU(s), the client, nanio and Postgres alone take "
            f"{budget['outside_broker_per_1000']:.1f} CPU-s per 1,000 packets: with a broker that used "
            f"no CPU at all this run could not pass {budget['ceiling_packets_per_s']:,.0f} packets/s here; with the "
            f"broker's {per['broker']:.1f} CPU-s counted, {budget['at_this_cpu_packets_per_s']:,.0f} packets/s.",
        ]
    return lines


def other_cpu(cpu: dict[str, float]) -> float:
    """The machine's CPU seconds not used by the run's own processes (other work sharing the cores)."""
    return cpu["machine"] - sum(cpu.get(n, 0.0) for n in _PARTIES)


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"
