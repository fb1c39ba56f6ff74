"""Reading a model's states at chosen token positions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

__all__ = ["ResolvedPosition", "select"]

#: A token index, or ``"mean"`` for the mean over a row's real tokens.
ResolvedPosition = int | Literal["mean"]


def select(states: torch.Tensor, mask: torch.Tensor, positions: Sequence[ResolvedPosition | str]) -> torch.Tensor:
    """(B, T, d) states → (B, d): the token at each row's position, or the mean over real tokens."""
    rows = []
    for i, position in enumerate(positions):
        if position == "mean":
            m = mask[i].to(states.dtype).unsqueeze(-1)  # (T, 1)
            rows.append((states[i] * m).sum(0) / m.sum())
        else:
            rows.append(states[i, int(position)])
    return torch.stack(rows)
