"""The Verifier & Safety Auditor (Algorithm 2, lines 13–18): probes before and after, then accept or roll back.

The student owner's probe suite has three parts, all the student's own:

* ``task`` inputs (with ``answers`` when the owner has them; otherwise the score is agreement
  with the student's own answers before ingestion — the task must not degrade);
* ``safety`` inputs whose output distribution must not move by more than a bound;
* ``flagged`` concepts: named sets of inputs the student runs itself to get flagged directions
  in its own space; a mapped concept that lands near one fires the auditor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from m2kt.nn.select import select
from m2kt.student.config import VerifierConfig
from m2kt.student.student import Student

__all__ = ["Check", "ProbeSuite", "Snapshot", "audit", "flagged_directions", "snapshot"]


@dataclass
class ProbeSuite:
    task: list[str] = field(default_factory=list)
    answers: list[str] | None = None
    safety: list[str] = field(default_factory=list)
    flagged: dict[str, list[str]] = field(default_factory=dict)
    flagged_position: int | str = "last"  # where a flagged input's state is read: 'last' or a token index

    def __post_init__(self) -> None:
        if self.answers is not None and len(self.answers) != len(self.task):
            raise ValueError(f"the suite has {len(self.task)} task inputs but {len(self.answers)} answers")
        for label, inputs in self.flagged.items():
            if not inputs:
                raise ValueError(f"flagged concept {label!r} has no inputs")

    @property
    def labelled(self) -> int:
        """Labelled examples the verifier uses (reported apart from the packet's data usage)."""
        return len(self.answers or ())

    @classmethod
    def load(cls, path: str | Path) -> ProbeSuite:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        unknown = sorted(set(data) - {"task", "answers", "safety", "flagged", "flagged_position"})
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {', '.join(unknown)}")
        return cls(**data)


@dataclass
class Snapshot:
    """What the suite saw at one moment."""

    predictions: list[str]
    task_score: float | None  # accuracy with answers; None without (agreement is computed against 'before')
    safety_outputs: torch.Tensor  # (S, V)


def snapshot(student: Student, suite: ProbeSuite) -> Snapshot:
    predictions = student.predict(suite.task) if suite.task else []
    score = None
    if suite.answers is not None and suite.task:
        score = sum(p == a for p, a in zip(predictions, suite.answers, strict=True)) / len(suite.task)
    outputs = student.answer_distribution(suite.safety) if suite.safety else torch.zeros(0, 0)
    return Snapshot(predictions, score, outputs)


def flagged_directions(student: Student, suite: ProbeSuite, layer: str) -> tuple[list[str], torch.Tensor]:
    """(labels, (F, d_S)): the student's own mean state for each flagged input set at ``layer``
    (at the suite's ``flagged_position``)."""
    labels = sorted(suite.flagged)
    if not labels:
        return [], torch.zeros(0, student.reader.d_model)
    rows = []
    for label in labels:
        batch = student.reader.tokenize(suite.flagged[label])
        ids, mask = batch.slice(0, len(batch), student.device)
        capture = student.forward(ids, mask)
        at = [n - 1 if suite.flagged_position == "last" else int(suite.flagged_position) for n in batch.lengths]
        rows.append(select(capture.hidden[layer].float(), mask, at).mean(0).cpu())
    return labels, torch.stack(rows)


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    value: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "detail": self.detail, "value": self.value}


NOTHING_VERIFIED = (
    "no verifier check ran, so nothing shows this ingestion is safe to keep: give a probe suite with task "
    "inputs (ingest(..., suite=ProbeSuite(task=...)); m2kt ingest --suite FILE, see the README's 'Ingest a "
    "packet') or concepts the verifier can check"
)


def decide(checks: list[Check]) -> bool:
    """Keep an ingestion only if every check passed — and at least one ran: an ingestion that verified
    nothing is rolled back, with a ``verified`` check saying why, never reported as accepted."""
    if not checks:
        checks.append(Check("verified", False, NOTHING_VERIFIED))
    return all(c.passed for c in checks)


def audit(
    before: Snapshot,
    after: Snapshot,
    *,
    config: VerifierConfig,
    mapped: torch.Tensor,
    mapped_labels: list[str],
    flagged_labels: list[str],
    flagged: torch.Tensor,
    origin: torch.Tensor,
) -> list[Check]:
    """Every check the verifier and auditor run; ingestion is kept only if all pass.

    Cosines between mapped concepts and flagged directions are taken after subtracting
    ``origin`` (the mean of the student's own concept representations): one model's states
    share a large common component that would otherwise make everything look alike.
    """
    checks: list[Check] = []
    if before.predictions:
        if before.task_score is not None and after.task_score is not None:
            drop = before.task_score - after.task_score
            checks.append(
                Check(
                    "task",
                    drop <= config.task_margin,
                    f"task accuracy {before.task_score:.3f} -> {after.task_score:.3f} "
                    f"(largest allowed drop {config.task_margin})",
                    after.task_score,
                )
            )
        else:
            same = sum(a == b for a, b in zip(before.predictions, after.predictions, strict=True))
            agreement = same / len(before.predictions)
            checks.append(
                Check(
                    "task",
                    1 - agreement <= config.task_margin,
                    f"{agreement:.3f} of task probes answered as before ingestion "
                    f"(largest allowed change {config.task_margin})",
                    agreement,
                )
            )
    if len(flagged) and len(mapped):
        m = torch.nn.functional.normalize(mapped.float().cpu() - origin, dim=-1)
        f = torch.nn.functional.normalize(flagged.float() - origin, dim=-1)
        cos = m @ f.T  # (n, F)
        worst = float(cos.max())
        i, j = divmod(int(cos.argmax()), cos.shape[1])
        checks.append(
            Check(
                "flagged_concepts",
                worst < config.safety_threshold,
                f"mapped concept {mapped_labels[i]!r} vs flagged {flagged_labels[j]!r}: cosine {worst:.3f} "
                f"(fires at {config.safety_threshold})",
                worst,
            )
        )
    if before.safety_outputs.numel():
        tv = 0.5 * (after.safety_outputs - before.safety_outputs).abs().sum(-1).mean()
        checks.append(
            Check(
                "safety_outputs",
                float(tv) <= config.output_bound,
                f"outputs on safety probes moved by total variation {float(tv):.3f} (bound {config.output_bound})",
                float(tv),
            )
        )
    return checks
