"""Concepts held in the student's own space: labelled vectors, and the nearest-concept classifier over them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ConceptMap", "nearest"]


def nearest(vectors: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
    """(N,) index of the concept (K, d) with the highest cosine to each vector (N, d)."""
    v = torch.nn.functional.normalize(vectors.float(), dim=-1)
    c = torch.nn.functional.normalize(concepts.float(), dim=-1)
    return (v @ c.T).argmax(-1)


@dataclass
class ConceptMap:
    """Concept labels and their vectors in one model's space, read at ``layer`` with ``pooling``."""

    labels: list[str]
    vectors: torch.Tensor  # (K, d)
    layer: str
    pooling: str

    def classify(self, embeddings: torch.Tensor) -> list[str]:
        return [self.labels[int(i)] for i in nearest(embeddings, self.vectors)]

    def meta(self) -> dict[str, Any]:
        return {"labels": self.labels, "layer": self.layer, "pooling": self.pooling}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], vectors: torch.Tensor) -> ConceptMap:
        return cls(list(meta["labels"]), vectors, str(meta["layer"]), str(meta["pooling"]))
