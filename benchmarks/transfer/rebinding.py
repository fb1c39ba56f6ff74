"""The re-binding conditions: M2KT through :func:`m2kt.student.ingest` end to end, verifier and rollback in the loop.

For a new-operation scenario and a budget of N teacher queries, the teacher chooses N probes of the new
operator from the pool (spread over the operand values, :func:`m2kt.teacher.selection.spread_probes`;
or the same seeded random sample KD gets, for the selection ablation), answers them in one forward pass,
and signs the packet; the student verifies it and ingests it with ``rebind`` on: its own operation tables
(forward passes of its frozen core, counted), the search, the binding, the verifier — and a refusal,
rolled back, when nothing it has explains the teacher. Conditions:

* ``m2kt-rebind`` — probe selection, slot binding (one pass), search;
* ``m2kt-rebind-vote`` — as a trace, with the ``VOTE - 1`` next programs that explain the probes and compute
  the same operation on the student's own tables answering too: the majority wins, so an error of the core
  on one program's path is outvoted (self-consistency; ``VOTE`` traces per answer);
* ``m2kt-rebind-trace`` — the same program applied as a trace (one pass per operation);
* ``m2kt-rebind-no-slots`` — slot binding off: the new operator can only be renamed to a known one;
* ``m2kt-rebind-no-selection`` — KD's random sample of the pool instead of the teacher's selection;
* ``m2kt-rebind-declared`` — the teacher searches its own behaviour and declares the decomposition;
  the student only checks it (search off). The teacher's own operation tables are counted as queries.

(Re-binding search off entirely is the composite-loss ``m2kt`` row.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m2kt.errors import IngestError
from m2kt.nn.adapters import adapter_for
from m2kt.nn.programs import Template
from m2kt.student import IngestConfig, InjectConfig, ProbeSuite, RebindConfig, Student, ingest
from m2kt.teacher.decompose import declare_decomposition
from m2kt.teacher.selection import spread_probes
from m2kt.toy.model import TinyTransformer
from m2kt.toy.symbolic import Example

__all__ = ["REBIND_CONDITIONS", "RebindRun", "run_rebind"]


@dataclass(frozen=True)
class RebindRun:
    """How one re-binding condition differs from ``m2kt-rebind``."""

    select: bool = True
    slots: bool = True
    apply: str = "inject"
    declared: bool = False
    vote: int = 1


VOTE = 9  # programs answering together in ``m2kt-rebind-vote`` (each costs its own passes per answer)

REBIND_CONDITIONS: dict[str, RebindRun] = {
    "m2kt-rebind": RebindRun(),
    "m2kt-rebind-vote": RebindRun(apply="trace", vote=VOTE),
    "m2kt-rebind-trace": RebindRun(apply="trace"),
    "m2kt-rebind-no-slots": RebindRun(slots=False),
    "m2kt-rebind-no-selection": RebindRun(select=False),
    "m2kt-rebind-declared": RebindRun(declared=True),
}


def _text(e: Example) -> str:
    return " ".join(e.tokens)


def probes_for(
    pool: list[Example], n: int, sample: list[Example], template: Template, *, select: bool, seed: int
) -> list[Example]:
    """The teacher's N probes: spread over the operand values, or KD's sample."""
    if not select:
        return list(sample)
    by_text = {_text(e): e for e in pool}
    return [by_text[t] for t in spread_probes(list(by_text), n, template, seed=seed)]


def run_rebind(
    *,
    condition: RebindRun,
    teacher: TinyTransformer,
    core: TinyTransformer,
    probes: list[Example],
    known: tuple[str, ...],
    operands: list[str],
    suite_texts: list[str],
    groups: dict[str, list[Example]],
    write_packet: Any,  # (probes, decomposition) -> Path
    key: Any,
    template: Template,
    device: str,
) -> dict[str, Any]:
    """Ingest one packet by re-binding and measure every test group; returns the record's fields."""
    t0 = time.perf_counter()
    decomposition = None
    if condition.declared and probes:
        answers = adapter_for(teacher).predict([_text(e) for e in probes])
        found = declare_decomposition(
            adapter_for(teacher).predict,
            template,
            probes[0].operator,
            list(known),
            operands,
            [_text(e) for e in probes],
            answers,
        )
        decomposition = found.as_params()  # declared even when nothing was found: its queries were spent
    path: Path = write_packet(probes, decomposition)
    student = Student(core)
    config = IngestConfig(
        rebind=RebindConfig(
            enabled=True,
            template=template.text,
            operators=list(known),
            operands=operands,
            slots=condition.slots,
            apply=condition.apply,  # type: ignore[arg-type]
            search=not condition.declared,
            vote=condition.vote,
        ),
        inject=InjectConfig(layer="embed.tok"),
        device=device,
    )
    report = None
    try:
        try:
            report = ingest(student, path, config, keys=key.verify_key, suite=ProbeSuite(task=suite_texts))
            refused = None if report.accepted else "; ".join(report.reasons)
        except IngestError as exc:  # e.g. no probes at all: nothing to identify the operation by
            refused = str(exc)
        accuracies = {g: student.accuracy([_text(e) for e in ex], [e.answer for e in ex]) for g, ex in groups.items()}
    finally:
        student.detach()
    info = report.rebinding if report is not None and report.rebinding else {}
    return {
        "accuracies": accuracies,
        "seconds": time.perf_counter() - t0,
        "packet_bytes": path.stat().st_size,
        "student_passes": int(info.get("student_passes", 0)),
        "teacher_queries": len(probes) + (int(decomposition["forward_passes"]) if decomposition else 0),
        "train": {
            "decision": report.decision if report is not None else "refused",
            "program": info.get("program"),
            "source": info.get("source"),
            "explained": info.get("explained"),
            "observations": info.get("observations"),
            "candidates": info.get("candidates"),
            "voters": info.get("voters", []),
            "refused": refused,
        },
    }
