"""The training step every M2KT ingestion runs: map the teacher's concepts through the CAL, take the
composite loss, step the optimiser, keep the map inside its trust region.

    trainer = CALTrainer(cal, params, LossWeights(), lr=1e-2, teacher_concepts=c_T, trust_region=0.3, trust_rows=t)
    for _ in range(steps):
        terms = trainer.step(lambda mapped: {"mapped": mapped[anchors], "target": c_S[anchors]})

``inputs(mapped)`` returns the keyword arguments of :class:`~m2kt.student.losses.CompositeLoss`; it is also
where the caller injects the mapped concepts and runs the student's forward pass for the structure and
reasoning terms. :func:`m2kt.student.ingest.ingest` and the transfer benchmark both train through here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from m2kt.student.losses import CompositeLoss, LossTerms, LossWeights

__all__ = ["CALTrainer", "project_to_trust_region"]

LossInputs = Callable[[torch.Tensor], dict[str, Any]]


class CALTrainer:
    """One Adam optimiser over the CAL and adapters, the composite loss, and an optional trust region.

    The zero-shot map (the CAL as it is when the trainer is made) is kept: the trust region pulls the
    mapped ``trust_rows`` back to within ``trust_region`` (relative distance) of it after every step.
    """

    def __init__(
        self,
        cal: nn.Module,
        params: Sequence[nn.Parameter],
        weights: LossWeights,
        *,
        lr: float,
        teacher_concepts: torch.Tensor,
        trust_region: float | None = None,
        trust_rows: Sequence[int] = (),
    ) -> None:
        self.cal = cal
        self.teacher_concepts = teacher_concepts  # (K, d_T)
        self.loss = CompositeLoss(weights)
        self.optimizer = torch.optim.Adam(list(params), lr=lr) if params else None
        self.trust_region = trust_region
        self.trust_rows = list(trust_rows)
        with torch.no_grad():
            self.zero_shot = cal(teacher_concepts).detach()  # (K, d_S)
        self.zero_state = {k: v.detach().clone() for k, v in cal.state_dict().items()}

    @property
    def can_train(self) -> bool:
        """False when there is nothing trainable (a closed-form or anchor-relative CAL and no adapters)."""
        return self.optimizer is not None

    def mapped(self) -> torch.Tensor:
        """φθ(c_T) as it is now, without gradient: (K, d_S)."""
        with torch.no_grad():
            return self.cal(self.teacher_concepts).detach()

    def step(self, inputs: LossInputs) -> LossTerms:
        """One optimiser step on the composite loss of ``inputs(φθ(c_T))``; returns the step's terms."""
        if self.optimizer is None:
            raise RuntimeError("nothing to train: the CAL has no trainable parameters and there are no adapters")
        mapped = self.cal(self.teacher_concepts)  # (K, d_S), with gradient
        total, terms = self.loss(**inputs(mapped))
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        if self.trust_region is not None:
            project_to_trust_region(
                self.cal, self.zero_state, self.zero_shot, self.teacher_concepts, self.trust_rows, self.trust_region
            )
        return terms


def project_to_trust_region(
    cal: torch.nn.Module,
    zero_state: dict[str, torch.Tensor],
    zero_shot: torch.Tensor,
    teacher_c: torch.Tensor,
    rows: Sequence[int],
    radius: float,
) -> None:
    """Trust region: pull the CAL back toward its zero-shot parameters until the mapped concepts
    move at most ``radius`` (relative) from the zero-shot map — by interpolating parameters."""
    with torch.no_grad():
        moved = cal(teacher_c)[list(rows)]
        base = zero_shot[list(rows)]
        distance = float((moved - base).norm() / base.norm().clamp_min(1e-12))
        if distance <= radius:
            return
        scale = radius / distance
        for name, tensor in cal.state_dict().items():
            if tensor.is_floating_point() and name in zero_state:
                tensor.copy_(zero_state[name] + scale * (tensor - zero_state[name]))
