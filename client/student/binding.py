"""Binding a concept to a slot of an input, not only to a token: how a re-bound operation enters the student.

A :class:`SlotBinding` is switched on by a trigger token at one position of the input (the new operator
token at the operator slot) and then writes, at a target position, the vector its table holds for the
token at a source position: ``a twice b`` can then run the student's own ``add`` on ``a`` and ``b + b``
in one pass — the operator slot gets ``add``'s vector, the second operand slot the vector of the token
``b + b`` (the table, filled from the student's own answers). A :class:`ProgramBinding` does the same as
a short trace: several passes of the frozen core, one per operation of the program — or of several
programs that vote.

Both are what ingestion trained (saved with the trainable state, rolled back with it); the core is never
written to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from m2kt.nn.programs import Expr, Template

__all__ = ["ProgramBinding", "SlotBinding", "SlotInjector"]


@dataclass
class SlotBinding:
    """Where ``input_ids[:, trigger_pos] == trigger``, position ``target_pos`` takes
    ``table[input_ids[:, source_pos]]`` (for source tokens whose row is ``defined``)."""

    trigger: int
    trigger_pos: int
    target_pos: int
    source_pos: int
    table: torch.Tensor  # (V, d) vectors by source token id
    defined: torch.Tensor  # (V,) bool: rows of the table that are set

    def meta(self) -> dict[str, int]:
        return {
            "trigger": self.trigger,
            "trigger_pos": self.trigger_pos,
            "target_pos": self.target_pos,
            "source_pos": self.source_pos,
        }


class SlotInjector(nn.Module):
    """The student's slot bindings, applied at the injection layer after token injection."""

    def __init__(self) -> None:
        super().__init__()
        self.bindings: list[SlotBinding] = []

    def set(self, bindings: list[SlotBinding]) -> None:
        self.bindings = list(bindings)

    def clear(self) -> None:
        self.bindings = []

    def apply(self, h: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T, d) → (B, T, d) with bound slots replaced."""
        if not self.bindings:
            return h
        out = h
        T = input_ids.shape[1]
        for b in self.bindings:
            if max(b.trigger_pos, b.target_pos, b.source_pos) >= T:
                continue
            source = input_ids[:, b.source_pos]  # (B,)
            table = b.table.to(device=h.device, dtype=h.dtype)
            known = source < len(b.defined)  # a token the table has no row for is left as it is
            defined = b.defined.to(h.device)[source.clamp(max=len(b.defined) - 1)]
            on = (input_ids[:, b.trigger_pos] == b.trigger) & known & defined  # (B,)
            if not bool(on.any()):
                continue
            if out is h:
                out = h.clone()
            rows = torch.nonzero(on).flatten()
            out[rows, b.target_pos] = table[source[rows]]
        return out

    def state(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for i, b in enumerate(self.bindings):
            state[f"slots.{i}.table"] = b.table
            state[f"slots.{i}.defined"] = b.defined
        return state

    def meta(self) -> list[dict[str, int]]:
        return [b.meta() for b in self.bindings]

    def load(self, meta: list[dict[str, int]], tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        self.bindings = [
            SlotBinding(
                table=tensors[f"slots.{i}.table"].to(device),
                defined=tensors[f"slots.{i}.defined"].to(device=device, dtype=torch.bool),
                **{k: int(v) for k, v in m.items()},
            )
            for i, m in enumerate(meta)
        ]


@dataclass(frozen=True)
class ProgramBinding:
    """An operator token the student answers by running ``program`` on its own core (a multi-pass trace).

    With ``voters``, every one of ``program`` and the voters runs and the answer most of them give wins
    (self-consistency): the voters are other compositions of the student's own operations that explain the
    teacher's probes, so where one runs into an error of the core, the others outvote it."""

    operator: str
    template: Template
    program: Expr
    voters: tuple[Expr, ...] = ()

    @property
    def programs(self) -> tuple[Expr, ...]:
        """The programs that answer: the chosen one first, then its voters."""
        return (self.program, *self.voters)

    def meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"operator": self.operator, "template": self.template.text, "program": str(self.program)}
        if self.voters:
            meta["voters"] = [str(v) for v in self.voters]
        return meta

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> ProgramBinding:
        return cls(
            str(meta["operator"]),
            Template(str(meta["template"])),
            Expr.parse(str(meta["program"])),
            tuple(Expr.parse(str(v)) for v in meta.get("voters", ())),
        )
