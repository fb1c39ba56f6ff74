"""Teacher-side safety scoring: each concept gets a score in [0, 1] from a pluggable scorer.

A scorer is any object with ``name``, ``version`` and ``score(concepts) -> (K,)``. The
built-in :class:`CosineFlaggedScorer` compares concept embeddings with flagged concept
directions: a concept's score is its largest cosine similarity to a flagged direction,
clipped to [0, 1]. Directions and concepts are compared after subtracting a common origin
(the mean state of the teacher's probes), because hidden states of one model share a large
common component that would otherwise make every concept look similar to every flag.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from m2kt.errors import SpecError

__all__ = ["CosineFlaggedScorer", "SafetyScorer", "load_flagged_directions"]


@runtime_checkable
class SafetyScorer(Protocol):
    name: str
    version: str

    def score(self, concepts: torch.Tensor) -> torch.Tensor:
        """(K, d) concept embeddings → (K,) scores in [0, 1]; 1 = flagged."""
        ...


class CosineFlaggedScorer:
    """Largest cosine to any flagged direction (after centring on ``origin``), clipped to [0, 1]."""

    name = "cosine-flagged"
    version = "1"

    def __init__(self, directions: torch.Tensor, origin: torch.Tensor | None = None) -> None:
        if directions.dim() != 2:
            raise SpecError(f"flagged directions must be a [F, d] matrix, not shape {tuple(directions.shape)}")
        self.directions = directions.float()  # (F, d)
        self.origin = origin.float() if origin is not None else torch.zeros(directions.shape[1])

    def score(self, concepts: torch.Tensor) -> torch.Tensor:
        if len(self.directions) == 0:
            return torch.zeros(concepts.shape[0])
        if concepts.shape[1] != self.directions.shape[1]:
            raise SpecError(
                f"flagged directions have width {self.directions.shape[1]} but concepts have width {concepts.shape[1]}"
            )
        c = torch.nn.functional.normalize(concepts.float() - self.origin, dim=-1)
        f = torch.nn.functional.normalize(self.directions - self.origin, dim=-1)
        return (c @ f.T).max(dim=1).values.clamp(0.0, 1.0)  # (K,)


def load_flagged_directions(path: str | Path, d_model: int) -> torch.Tensor:
    """The ``directions`` tensor [F, d_T] of a safetensors file (never a pickle)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise SpecError(f"safety.flagged_file {str(path)!r}: cannot read it as safetensors ({exc})") from None
    if "directions" not in tensors:
        raise SpecError(f"safety.flagged_file {str(path)!r} has no 'directions' tensor (found: {sorted(tensors)})")
    directions = torch.from_numpy(tensors["directions"].astype("float32"))
    if directions.dim() != 2 or directions.shape[1] != d_model:
        raise SpecError(
            f"safety.flagged_file: 'directions' has shape {list(directions.shape)}, "
            f"but the teacher's width is d_T = {d_model}; expected [F, {d_model}]"
        )
    return directions
