"""Prometheus metrics, one registry per app (so tests can run several apps in a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "m2kt_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.bytes_in = Counter("m2kt_bytes_in", "Packet bytes received", registry=self.registry)
        self.bytes_out = Counter("m2kt_bytes_out", "Packet bytes served", registry=self.registry)
        self.validation_failures = Counter(
            "m2kt_validation_failures", "Refused uploads by code", ["code"], registry=self.registry
        )
        self.upload_seconds = Histogram(
            "m2kt_upload_seconds",
            "Upload latency (accepted packets)",
            registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.packets_accepted = Counter("m2kt_packets_accepted", "Packets stored", ["status"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
