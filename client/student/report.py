"""What an ingestion did and why: the typed result of :func:`m2kt.student.ingest.ingest`.

``IngestReport.to_json()`` is the ``report.json`` the CLI writes and the receipt a student posts to the
broker: losses per step and term, probe scores before and after, every check, the decision, data usage
and timings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["IngestReport", "outcome_fields"]

Decision = Literal["accepted", "rolled_back"]


@dataclass
class IngestReport:
    packet: dict[str, Any]  # id, topic, teacher, concepts, data_usage (the manifest's)
    decision: Decision
    reasons: list[str]  # the details of every check that failed
    checks: list[dict[str, Any]]  # name, passed, detail, value
    probe_scores: dict[str, Any]  # before, after, measure
    injected: list[str]  # concept labels now in the student (empty when rolled back)
    anchors: dict[str, list[str]]  # train, holdout
    losses: list[dict[str, Any]]  # per step: geo, struct, reason, safety, total, holdout_geo
    zero_shot_holdout_geo: float | None
    best_step: int  # -1: the zero-shot map was kept
    steps_run: int
    stopped_early: bool
    trainable_parameters: int
    notes: list[str]
    data_usage: dict[str, Any]  # teacher queries and labels (the packet's), the verifier's labels, student passes
    device: str
    mixed_precision: str | None
    timings: dict[str, float | None]  # probe, train, verify, total (seconds), steps_per_second
    config: dict[str, Any]
    student: dict[str, Any] = field(default_factory=dict)  # core_sha256, layer, inject_layer
    rebinding: dict[str, Any] | None = None  # re-binding only: target, program, source, explained, cost
    alignment: dict[str, Any] | None = None  # alignment only: method, its parameter and score, anchors, reuse

    @property
    def accepted(self) -> bool:
        return self.decision == "accepted"

    def scores(self) -> dict[str, float]:
        """The numeric probe scores (``before`` / ``after``), as a receipt carries them."""
        return {
            k: float(v)
            for k in ("before", "after")
            if isinstance(v := self.probe_scores.get(k), (int, float)) and not isinstance(v, bool)
        }

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data (what ``report.json`` holds)."""
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path


def outcome_fields(packet_id: str, manifest: Any, checks: list[Any], accepted: bool) -> dict[str, Any]:
    """The fields every ingestion path reports alike: the packet (id, topic, teacher, concept count, the
    manifest's data usage), the decision, and the checks with the details of those that failed."""
    return {
        "packet": {
            "id": packet_id,
            "topic": manifest.topic,
            "teacher": manifest.teacher.model_name,
            "concepts": len(manifest.concepts),
            "data_usage": manifest.data_usage.model_dump(),
        },
        "decision": "accepted" if accepted else "rolled_back",
        "reasons": [c.detail for c in checks if not c.passed],
        "checks": [c.as_dict() for c in checks],
    }
