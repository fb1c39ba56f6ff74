"""What a rollback restores, bit for bit: every part of a student an ingestion may change."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from m2kt.student.binding import ProgramBinding, SlotBinding
from m2kt.student.concepts import ConceptMap
from m2kt.student.student import Student

__all__ = ["Checkpoint", "checkpoint", "rollback"]


@dataclass
class Checkpoint:
    """Everything an ingestion may change in a student: CAL, adapters, injection, inject layer, metadata."""

    cal: nn.Module | None
    adapters: frozenset[str]
    state: dict[str, torch.Tensor]
    injection: tuple[list[int], list[str]]
    inject_layer: str
    meta: dict[str, Any]
    slots: list[SlotBinding]
    programs: dict[str, ProgramBinding]
    concepts: ConceptMap | None


def checkpoint(student: Student, *, inject_layer: str | None = None) -> Checkpoint:
    """The student's trainable state now (``inject_layer``: the layer to restore, if it was changed since)."""
    return Checkpoint(
        cal=copy.deepcopy(student.cal),
        adapters=frozenset(student.adapters.keys()),
        state=student.trainable_state(),
        injection=(list(student.injector.token_ids), list(student.injector.labels)),
        inject_layer=inject_layer or student.inject_layer,
        meta=dict(student.meta),
        slots=[replace(b, table=b.table.clone(), defined=b.defined.clone()) for b in student.slots.bindings],
        programs=dict(student.programs),
        concepts=copy.deepcopy(student.concepts),
    )


def rollback(student: Student, saved: Checkpoint) -> None:
    """Back to the exact state of ``saved``: CAL, adapters, injection, slot and program bindings, inject
    layer, metadata."""
    student.cal = saved.cal
    for key in list(student.adapters.keys()):
        if key not in saved.adapters:
            del student.adapters[key]
    student.inject_layer = saved.inject_layer
    student.install_hooks()
    student.restore(saved.state, saved.injection)
    student.slots.set(saved.slots)
    student.programs = dict(saved.programs)
    student.concepts = copy.deepcopy(saved.concepts)
    student.meta = dict(saved.meta)
