"""What adapters hand around: tokenised inputs (right-padded) and what one forward pass exposed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Batch", "Capture", "pad_rows"]


@dataclass
class Batch:
    """Tokenised probe inputs, right-padded."""

    input_ids: torch.Tensor  # (P, L) long
    mask: torch.Tensor  # (P, L) bool, True on real tokens
    lengths: list[int]

    def __len__(self) -> int:
        return len(self.lengths)

    def slice(self, start: int, stop: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(self.lengths[start:stop])
        return (
            self.input_ids[start:stop, :width].to(device, non_blocking=True),
            self.mask[start:stop, :width].to(device, non_blocking=True),
        )


@dataclass
class Capture:
    """What one forward pass exposed."""

    hidden: dict[str, torch.Tensor]  # layer name -> (B, T, d)
    attentions: list[torch.Tensor] | None  # per attention layer, (B, H, T, T)
    logits: torch.Tensor | None  # (B, T, V)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> Batch:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return Batch(ids, mask, [len(r) for r in rows])
