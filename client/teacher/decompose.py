"""A teacher declaring its own operation as a composition of operations the student also has.

The teacher searches its *own* behaviour (:func:`m2kt.nn.programs.search`): it answers every ``x op y``
of its known operations over the operand domain and the probes of its new operation, and keeps the
composition that explains all of its own answers. The packet then carries the program in its manifest
(``extraction.traces.params.decomposition``) so a student can check it against the probes instead of
searching. Every teacher forward pass this takes is counted: the caller adds ``forward_passes`` to the
packet's data usage — a declared decomposition is cheap for the student and expensive in teacher queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from m2kt.nn.programs import Observation, OperationTables, Predict, Template, search

__all__ = ["Decomposition", "declare_decomposition"]


@dataclass(frozen=True)
class Decomposition:
    operator: str  # the operator token it explains
    program: str | None  # e.g. 'sub(a, sub("0", b))'; None when no composition explains the answers
    explained: int
    observations: int
    forward_passes: int  # teacher forward passes the search used (its own operation tables)

    def as_params(self) -> dict[str, Any]:
        """What goes into the manifest (``extraction.traces.params["decomposition"]``)."""
        return {
            "operator": self.operator,
            "program": self.program,
            "explained": self.explained,
            "observations": self.observations,
            "forward_passes": self.forward_passes,
        }


def declare_decomposition(
    predict: Predict,
    template: Template,
    operator: str,
    known_operators: Sequence[str],
    domain: Sequence[str],
    probes: Sequence[str],
    answers: Sequence[str],
) -> Decomposition:
    """The simplest composition of ``known_operators`` that explains the teacher's own ``answers`` to
    ``probes`` of ``operator`` (``program`` None if none does). ``predict`` is the teacher's own answer function."""
    observations = []
    for text, answer in zip(probes, answers, strict=True):
        slots = template.parse(text)
        if slots is not None and slots[1] == operator:
            observations.append(Observation(slots[0], slots[2], answer))
    tables = OperationTables.probe(predict, template, known_operators, domain)
    result = search(observations, tables, known_operators)
    program = str(result.program) if result.program is not None else None
    return Decomposition(operator, program, result.explained, result.total, tables.passes)
